"""Turns a scheduled step into one flat forward pass: prefill chunks first, then one token per decode."""

from __future__ import annotations

import torch

from common.engine.scheduler import SchedulerOutput
from common.engine.sequence import Sequence
from common.kvcache import BlockManager, BlockPool
from common.model.decoder import DeepseekModel
from common.model.mla import AttentionBatch


class ModelRunner:
    def __init__(
        self, model: DeepseekModel, pool: BlockPool, blocks: BlockManager, device: torch.device
    ) -> None:
        self.model, self.pool, self.blocks, self.device = model, pool, blocks, device

    @torch.inference_mode()
    def run(self, step: SchedulerOutput) -> tuple[torch.Tensor, list[Sequence]]:
        """Returns logits [S, V] (float32) for the S sequences that sample a token this step, in order."""
        ids: list[int] = []
        positions: list[int] = []
        sampling: list[Sequence] = []
        logits_rows: list[int] = []
        for seq, n in step.prefills:
            start = seq.num_computed_tokens
            ids += seq.token_ids[start : start + n]
            positions += range(start, start + n)
            if start + n == seq.num_tokens:
                sampling.append(seq)
                logits_rows.append(len(ids) - 1)
        for seq in step.decodes:
            ids.append(seq.token_ids[-1])
            positions.append(seq.num_tokens - 1)
            sampling.append(seq)
            logits_rows.append(len(ids) - 1)

        batch = AttentionBatch.build(
            [(self.blocks.block_table(s.seq_id), s.num_computed_tokens, n) for s, n in step.prefills],
            [(self.blocks.block_table(s.seq_id), s.num_tokens) for s in step.decodes],
            self.pool.block_size,
            self.device,
        )
        if step.copies:
            self.pool.copy_blocks(step.copies)
        logits = self.model(
            torch.tensor(ids, device=self.device),
            torch.tensor(positions, device=self.device),
            batch,
            self.pool,
            torch.tensor(logits_rows, dtype=torch.long, device=self.device),
        )
        return logits, sampling
