"""The public Router gRPC API over the streaming engine: a thin adapter, no serving logic of its own."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import grpc

from common.engine.async_engine import AsyncEngine
from common.engine.engine import RequestOutput
from common.engine.sampling_params import SamplingParams
from latentmoe.v1 import router_pb2, router_pb2_grpc

SERVICE_NAME = router_pb2.DESCRIPTOR.services_by_name["Router"].full_name


def params_from_proto(msg: router_pb2.SamplingParams) -> SamplingParams:
    """Only the fields the client set; SamplingParams validates them (ValueError names the field)."""
    fields: dict[str, Any] = {f.name: v for f, v in msg.ListFields()}
    return SamplingParams.from_dict(
        {k: list(v) if k in ("stop", "stop_token_ids") else v for k, v in fields.items()}
    )


def response_from_output(out: RequestOutput) -> router_pb2.GenerateResponse:
    completions = []
    for c in out.outputs:
        logprobs = [
            router_pb2.TokenLogprob(token_id=lp["token_id"], logprob=lp["logprob"], top=lp["top"])
            for lp in c.logprobs[len(c.token_ids) - len(c.delta_token_ids) :]
        ]
        completions.append(
            router_pb2.Completion(
                index=c.index,
                delta_token_ids=c.delta_token_ids,
                delta_text=c.delta_text,
                finish_reason=c.finish_reason or "",
                logprobs=logprobs,
            )
        )
    usage = router_pb2.Usage(
        prompt_tokens=len(out.prompt_token_ids),
        completion_tokens=sum(len(c.token_ids) for c in out.outputs),
        cached_prompt_tokens=out.num_cached_tokens,
    )
    return router_pb2.GenerateResponse(
        request_id=out.request_id, completions=completions, finished=out.finished, usage=usage
    )


class RouterServicer(router_pb2_grpc.RouterServicer):
    def __init__(self, engine: AsyncEngine, model_name: str, max_pending: int = 1024) -> None:
        self.engine = engine
        self.model_name = model_name
        self.max_pending = max_pending
        self.pending = 0

    async def Generate(  # noqa: N802 (gRPC method name)
        self, request: router_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[router_pb2.GenerateResponse]:
        if self.pending >= self.max_pending:
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"{self.pending} requests in flight (limit {self.max_pending})",
            )
        kind = request.WhichOneof("prompt")
        if kind is None:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "prompt is empty: set text or token_ids")
        prompt = request.text if kind == "text" else list(request.token_ids.ids)
        self.pending += 1
        try:
            params = params_from_proto(request.params)
            stream = self.engine.generate(prompt, params, request.request_id or None)
            async for out in stream:
                yield response_from_output(out)
        except ValueError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        finally:
            self.pending -= 1

    async def Abort(  # noqa: N802
        self, request: router_pb2.AbortRequest, context: grpc.aio.ServicerContext
    ) -> router_pb2.AbortResponse:
        known = request.request_id in self.engine.engine.requests
        self.engine.abort(request.request_id)
        return router_pb2.AbortResponse(aborted=known)

    async def ModelInfo(  # noqa: N802
        self, request: router_pb2.ModelInfoRequest, context: grpc.aio.ServicerContext
    ) -> router_pb2.ModelInfoResponse:
        engine = self.engine.engine
        cfg = engine.model_config
        raw = {k: v for k, v in cfg.to_hub_dict().items() if k != "extra"}
        return router_pb2.ModelInfoResponse(
            model=self.model_name,
            model_type=cfg.model_type,
            vocab_size=cfg.vocab_size,
            max_model_len=engine.max_model_len,
            dtype=str(engine.config.torch_dtype).removeprefix("torch."),
            num_layers=cfg.num_hidden_layers,
            n_routed_experts=cfg.n_routed_experts,
            num_experts_per_tok=cfg.num_experts_per_tok,
            kv_cache_tokens=engine.blocks.num_blocks * engine.blocks.block_size,
            block_size=engine.blocks.block_size,
            config_json=json.dumps(raw).encode(),
        )
