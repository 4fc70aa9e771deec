"""The in-process inference engine: requests in, token deltas out, one `step()` at a time.

    engine = LLMEngine.from_checkpoint("checkpoints/mini", EngineConfig(dtype="float32"))
    outputs = engine.generate(["Hello"], SamplingParams(temperature=0, max_tokens=16))

Every way of generating (CLI, servers, benchmarks) goes through `step()`: schedule -> model runner -> sampler
-> stop checks. Bad input raises ValueError for that request only; nothing is queued for it.
"""

from __future__ import annotations

import itertools
import logging
import math
import time
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tokenizers import Tokenizer

from common import metrics
from common.checkpoint import load_model, load_tokenizer
from common.config import EngineConfig, ModelConfig, matmul_dtype
from common.engine.detokenizer import IncrementalDetokenizer
from common.engine.model_runner import AttentionBackend, LocalAttention, ModelRunner, PagesDoNotFit
from common.engine.sampler import SampleOutput, Sampler
from common.engine.sampling_params import SamplingParams
from common.engine.scheduler import Scheduler
from common.engine.sequence import Request, Sequence
from common.kernels import bf16_gemm
from common.kvcache import BlockManager, BlockPool
from common.model.decoder import DeepseekModel
from common.model.moe import MoE

log = logging.getLogger(__name__)
METRICS_INTERVAL_S = 0.25  # while there is work, metrics need be no fresher: scrapes are seconds apart


@dataclass
class CompletionOutput:
    index: int
    token_ids: list[int]  # all generated ids so far
    text: str  # all text streamed so far
    delta_token_ids: list[int]
    delta_text: str
    finish_reason: str | None = None
    logprobs: list[dict] = field(default_factory=list)  # per generated token: {"logprob", "top": {id: lp}}


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    num_cached_tokens: int = 0


class LLMEngine:
    def __init__(
        self,
        model_config: ModelConfig,
        model: DeepseekModel,
        tokenizer: Tokenizer | None,
        config: EngineConfig,
        attention: AttentionBackend | None = None,
    ) -> None:
        """attention: where the latent pages live and attention runs (default: a pool in this process; the
        distributed router passes its attention workers, whose block manager is the KV-cache service's)."""
        self.model_config, self.config, self.tokenizer = model_config, config, tokenizer
        if (config.max_model_len or 0) > model_config.max_position_embeddings:
            raise ValueError(
                f"max_model_len {config.max_model_len} is beyond the model's "
                f"{model_config.max_position_embeddings} positions (max_position_embeddings)"
            )
        device = next(model.parameters()).device
        if attention is None:
            num_blocks = self._num_blocks(model_config, config, device)
            pool = BlockPool(
                model_config.num_hidden_layers,
                num_blocks,
                config.block_size,
                model_config.latent_dim,
                dtype=config.torch_dtype,
                device=device,
            )
            attention = LocalAttention(
                pool, BlockManager(num_blocks, config.block_size, config.enable_prefix_caching)
            )
            log.info(
                "KV cache: %d blocks of %d tokens = %d tokens (%.1f MiB, %d bytes/token)",
                num_blocks,
                config.block_size,
                pool.capacity_tokens,
                pool.nbytes / 2**20,
                pool.nbytes // pool.capacity_tokens,
            )
        self.blocks = attention.blocks
        self.max_model_len = min(
            config.max_model_len or model_config.max_position_embeddings,
            attention.max_blocks_per_sequence * self.blocks.block_size,
        )
        self.scheduler = Scheduler(config, self.blocks)
        self.expert_load = metrics.ExpertLoad(
            model_config.moe_layers, model_config.n_routed_experts, device=device
        )
        self.runner = ModelRunner(
            model,
            attention,
            device,
            before_attempt=self.expert_load.discard,
            enforce_eager=config.enforce_eager,
        )
        self.sampler = Sampler()
        self.requests: dict[str, Request] = {}
        self.device = device
        self._ids = itertools.count()
        self._install_metrics(model)

    def _install_metrics(self, model: DeepseekModel) -> None:
        """Each gate counts its choices into the expert-load row of its layer."""
        for i, layer in enumerate(model.layers):
            if isinstance(layer.mlp, MoE):
                layer.mlp.gate.counts = self.expert_load.counts_of(i)
        metrics.KV_BLOCKS.labels("total").set(self.blocks.num_blocks)
        self._published = {"prefix_queries": 0, "prefix_hits": 0, "preemptions": 0}
        self._metrics_time = -math.inf

    def _publish_step_metrics(self) -> None:
        """Expert load is counted every step (its imbalance is over a window of steps); it and the block
        counters (a round trip when the block manager is remote) are published at most every
        METRICS_INTERVAL_S while there is work, and always once the engine runs out of it."""
        now = time.monotonic()
        due = not self.scheduler.has_work or now - self._metrics_time >= METRICS_INTERVAL_S
        self.expert_load.flush(publish=due)
        if not due:
            return
        self._metrics_time = now
        stats = self.blocks.stats()
        metrics.KV_BLOCKS.labels("used").set(stats.used)
        metrics.KV_BLOCKS.labels("cached").set(stats.cached)
        metrics.KV_USAGE.set(stats.usage)
        metrics.REQUESTS_RUNNING.set(len(self.scheduler.running))
        metrics.REQUESTS_WAITING.set(len(self.scheduler.waiting))
        for name, counter, value in (
            ("prefix_queries", metrics.PREFIX_QUERIES, stats.prefix_queries),
            ("prefix_hits", metrics.PREFIX_HITS, stats.prefix_hits),
            ("preemptions", metrics.PREEMPTIONS, self.scheduler.num_preemptions),
        ):
            counter.inc(value - self._published[name])
            self._published[name] = value

    @classmethod
    def from_checkpoint(
        cls,
        directory: str | Path,
        config: EngineConfig | None = None,
        local_experts: bool = True,
        attention: AttentionBackend | None = None,
    ) -> LLMEngine:
        """local_experts=False loads no routed expert (they run elsewhere, e.g. on expert actors); nor is
        any MLA weight loaded for an `attention` backend that runs attention elsewhere (attention workers)."""
        config = config or EngineConfig()
        dtype = config.torch_dtype
        if matmul_dtype(dtype, config.torch_device.type) != dtype:
            how = "in float32 (the weights stay in memory as they are)"
            if dtype == torch.bfloat16 and bf16_gemm.available():
                how = f"in latentmoe's bfloat16 kernel at up to {bf16_gemm.MAX_ROWS} rows, beyond that {how}"
            log.info(
                "this CPU has no %s matmul units: those matmuls run %s; --dtype auto picks float32 here",
                str(dtype).removeprefix("torch."),
                how,
            )
        model_config, model = load_model(
            directory,
            config.torch_dtype,
            config.torch_device,
            expert_ids=None if local_experts else [],
            attention=attention is None or attention.needs_mla_weights,
        )
        engine = cls(model_config, model, load_tokenizer(directory), config, attention)
        if local_experts and attention is None:  # the whole model is here: run its largest chunk once
            engine.runner.warm_up(min(config.max_num_batched_tokens, engine.max_model_len - 1))
        return engine

    @staticmethod
    def _num_blocks(model_config: ModelConfig, config: EngineConfig, device: torch.device) -> int:
        """Blocks that fit the memory budget, but no more than max_num_seqs full-length sequences need."""
        dtype = config.torch_dtype
        budget = int(config.kv_cache_memory) if config.kv_cache_memory > 1 else float(config.kv_cache_memory)
        fit = BlockPool.num_blocks_for_budget(
            budget, model_config.num_hidden_layers, config.block_size, model_config.latent_dim, dtype, device
        )
        max_len = config.max_model_len or model_config.max_position_embeddings
        useful = config.max_num_seqs * -(-max_len // config.block_size)
        return min(fit, useful)

    # ------------------------------------------------------------------ requests
    def add_request(
        self,
        prompt: str | Seq[int],
        params: SamplingParams | None = None,
        request_id: str | None = None,
        final_only: bool = False,
    ) -> str:
        """Queue a request; raises ValueError (nothing queued) if the prompt or params cannot be served.
        final_only: step() returns its output once, when it finishes (Request.final_only)."""
        params = params or SamplingParams()
        request_id = request_id if request_id is not None else str(next(self._ids))
        if request_id in self.requests:
            raise ValueError(f"request_id {request_id!r} is already in use")
        prompt_ids = self.validate_prompt(prompt, params)
        request = Request(request_id, prompt_ids, params, final_only=final_only)
        metrics.PROMPT_TOKENS.inc(len(prompt_ids))
        seq = self._new_sequence(request, 0)
        request.seqs.append(seq)
        self.requests[request_id] = request
        self.scheduler.add(seq)
        return request_id

    def validate_prompt(self, prompt: str | Seq[int], params: SamplingParams) -> list[int]:
        if not isinstance(params, SamplingParams):
            raise ValueError(f"params must be SamplingParams, got {type(params).__name__}")
        if not isinstance(prompt, str | list | tuple):
            raise ValueError(f"prompt must be a string or a list of token ids, got {type(prompt).__name__}")
        if len(prompt) == 0:
            raise ValueError("prompt is empty")
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("this model has no tokenizer: send prompt token ids")
            ids = self.tokenizer.encode(prompt, add_special_tokens=False).ids
            if self.model_config.bos_token_id is not None:
                ids = [self.model_config.bos_token_id, *ids]
        else:
            ids = list(prompt)
            bad = [t for t in ids if isinstance(t, bool) or not isinstance(t, int)]
            bad += [t for t in ids if isinstance(t, int) and not 0 <= t < self.model_config.vocab_size]
            if bad:
                raise ValueError(
                    f"prompt token ids must be integers in [0, {self.model_config.vocab_size}), got {bad[:5]}"
                )
        if len(ids) >= self.max_model_len:
            raise ValueError(
                f"prompt has {len(ids)} tokens; this server's context is {self.max_model_len} tokens "
                "(prompt + at least one generated token)"
            )
        return ids

    def _new_sequence(self, request: Request, index: int) -> Sequence:
        params = request.params
        generator = None
        if params.seed is not None and not params.greedy:
            generator = torch.Generator(device=self.device).manual_seed(params.seed + index)
        detok = None
        if self.tokenizer is not None:
            detok = IncrementalDetokenizer(
                self.tokenizer,
                request.prompt_ids,
                params.skip_special_tokens,
                params.stop,
                params.include_stop_str_in_output,
                deferred=request.final_only and not params.stop,
            )
        return Sequence(request, index, detokenizer=detok, generator=generator)

    def abort(self, request_id: str) -> bool:
        """Stop a request and free its pages at once. Returns False if it was unknown or already done."""
        request = self.requests.pop(request_id, None)
        if request is None:
            return False
        for seq in request.seqs:
            if not seq.finished:
                self.scheduler.finish(seq, "abort")
        metrics.REQUESTS_FINISHED.labels("abort").inc()
        return True

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_work

    # ------------------------------------------------------------------ the step
    def step(self) -> list[RequestOutput]:
        """One scheduling round and forward pass; the step's block-manager ops go out together."""
        with self.blocks.deferred():
            return self._step()

    def _step(self) -> list[RequestOutput]:
        plan = self.scheduler.schedule()
        if plan.empty:
            return []
        now = time.monotonic()
        for seq, _ in plan.prefills:
            if seq.request.first_scheduled_time is None:
                seq.request.first_scheduled_time = now
        while True:
            try:
                logits, sampling = self.runner.run(plan)
                break
            except PagesDoNotFit as e:
                log.info("%s: preempting them", e)
                for seq in e.seqs:
                    self.scheduler.preempt(seq)
                plan = plan.without(e.seqs)
                if plan.empty:
                    self._publish_step_metrics()
                    return []
        self.scheduler.mark_computed(plan)
        if not sampling:  # only prefill chunks that do not finish their prompt
            self._publish_step_metrics()
            return []

        # A request with n > 1 forks its prompt's pages into n sequences when the prompt is done.
        rows: list[int] = []
        seqs: list[Sequence] = []
        for row, seq in enumerate(sampling):
            rows.append(row)
            seqs.append(seq)
            request = seq.request
            if request.params.n > 1 and len(request.seqs) == 1 and not seq.output_ids:
                for index in range(1, request.params.n):
                    child = self._new_sequence(request, index)
                    request.seqs.append(child)
                    self.scheduler.fork(seq, child)
                    rows.append(row)
                    seqs.append(child)
        logits = logits[torch.tensor(rows, device=logits.device)] if len(rows) != len(sampling) else logits
        sample = self.sampler(logits, [s.request.params for s in seqs], [s.generator for s in seqs])
        self._append_tokens(seqs, sample)
        outputs = self._collect_outputs({s.request.request_id: s.request for s in seqs}.values())
        self._publish_step_metrics()
        return outputs

    def _append_tokens(self, seqs: list[Sequence], sample: SampleOutput) -> None:
        token_ids = sample.token_ids.tolist()
        logprobs = sample.logprobs.tolist() if sample.logprobs is not None else None
        top_ids = sample.top_ids.tolist() if sample.top_ids is not None else None
        top_lps = sample.top_logprobs.tolist() if sample.top_logprobs is not None else None
        now = time.monotonic()
        for i, (seq, token) in enumerate(zip(seqs, token_ids, strict=True)):
            params = seq.request.params
            seq.output_ids.append(token)
            request = seq.request
            if request.first_token_time is None:
                request.first_token_time = now
                metrics.TTFT.observe(now - request.arrival_time)
                metrics.QUEUE_TIME.observe((request.first_scheduled_time or now) - request.arrival_time)
            elif seq.last_token_time is not None:
                metrics.ITL.observe(now - seq.last_token_time)
            seq.last_token_time = now
            if params.logprobs is not None and logprobs is not None:
                k = params.logprobs
                top = dict(zip(top_ids[i][:k], top_lps[i][:k], strict=True)) if top_ids and k else {}
                seq.logprobs.append({"token_id": token, "logprob": logprobs[i], "top": top})
            if seq.detokenizer is not None:
                seq.pending_text += seq.detokenizer.add(token)
            reason = self._stop_reason(seq, token)
            if reason is not None:
                if seq.detokenizer is not None:
                    seq.pending_text += seq.detokenizer.flush()
                self.scheduler.finish(seq, reason)
                if request.finished:
                    metrics.E2E.observe(now - request.arrival_time)
                    metrics.REQUESTS_FINISHED.labels(reason).inc()
        metrics.GENERATION_TOKENS.inc(len(token_ids))

    def _stop_reason(self, seq: Sequence, token: int) -> str | None:
        params = seq.request.params
        if not params.ignore_eos and token in self.model_config.eos_token_ids:
            return "stop"
        if token in params.stop_token_ids:
            return "stop"
        if seq.detokenizer is not None and seq.detokenizer.stopped is not None:
            return "stop"
        if len(seq.output_ids) >= params.max_tokens or seq.num_tokens >= self.max_model_len:
            return "length"
        return None

    def _collect_outputs(self, requests: Seq[Request]) -> list[RequestOutput]:
        outputs = []
        for request in requests:
            if request.final_only and not request.finished:
                continue
            completions = []
            for seq in request.seqs:
                delta_ids = seq.output_ids[seq.sent_tokens :]
                delta_text, seq.pending_text = seq.pending_text, ""
                seq.sent_tokens = len(seq.output_ids)
                completions.append(
                    CompletionOutput(
                        index=seq.index,
                        token_ids=list(seq.output_ids),
                        text=seq.detokenizer.text if seq.detokenizer is not None else "",
                        delta_token_ids=delta_ids,
                        delta_text=delta_text,
                        finish_reason=seq.finish_reason,
                        logprobs=seq.logprobs,
                    )
                )
            finished = request.finished
            if finished:
                self.requests.pop(request.request_id, None)
            outputs.append(
                RequestOutput(
                    request.request_id, request.prompt_ids, completions, finished, request.num_cached_tokens
                )
            )
        return outputs

    # ------------------------------------------------------------------ batch API
    def generate(
        self, prompts: Seq[str | Seq[int]], params: SamplingParams | Seq[SamplingParams] | None = None
    ) -> list[RequestOutput]:
        """Run the given prompts to completion together; outputs in prompt order."""
        params_list = (
            params if isinstance(params, list | tuple) else [params or SamplingParams()] * len(prompts)
        )
        ids = [self.add_request(p, sp, final_only=True) for p, sp in zip(prompts, params_list, strict=True)]
        final: dict[str, RequestOutput] = {}
        while len(final) < len(ids):
            for out in self.step():
                if out.finished:
                    final[out.request_id] = out
        return [final[i] for i in ids]
