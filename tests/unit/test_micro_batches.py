"""ModelRunner.split: a step cut into micro-batches keeps every sequence once, in order, prefill chunks before
decodes in each part, with about equal token counts."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from common.engine.model_runner import ModelRunner
from common.engine.scheduler import SchedulerOutput


def step(prefill_lens: list[int], num_decodes: int) -> SchedulerOutput:
    seqs = [SimpleNamespace(name=f"p{i}") for i in range(len(prefill_lens))]
    decodes = [SimpleNamespace(name=f"d{i}") for i in range(num_decodes)]
    return SchedulerOutput(prefills=list(zip(seqs, prefill_lens)), decodes=decodes)


@pytest.mark.parametrize(
    "prefill_lens, num_decodes",
    [([], 32), ([64] * 4, 0), ([100], 10), ([3, 200, 5], 7), ([], 1), ([7], 0), ([10, 10], 1)],
)
@pytest.mark.parametrize("parts", [1, 2, 3])
def test_split_keeps_every_sequence_once_in_order_and_balances_tokens(prefill_lens, num_decodes, parts):
    plan = step(prefill_lens, num_decodes)
    groups = ModelRunner.split(plan, parts)
    assert 1 <= len(groups) <= min(parts, len(plan.prefills) + len(plan.decodes))
    assert all(prefills or decodes for prefills, decodes in groups)
    assert [s for p, _ in groups for s, _ in p] == [s for s, _ in plan.prefills]
    assert [s for _, d in groups for s in d] == plan.decodes
    assert [(s, n) for p, _ in groups for s, n in p] == plan.prefills  # chunk lengths unchanged
    tokens = [sum(n for _, n in p) + len(d) for p, d in groups]
    assert sum(tokens) == plan.num_tokens
    if len(groups) > 1 and not prefill_lens:  # decodes alone: as even as the count allows
        assert max(tokens) - min(tokens) <= 1


def test_split_in_two_halves_of_a_decode_batch():
    groups = ModelRunner.split(step([], 32), 2)
    assert [len(d) for _, d in groups] == [16, 16]


@pytest.mark.parametrize(
    "most, min_tokens, num_tokens, expected",
    [(2, 0, 1, 2), (2, 512, 32, 1), (2, 512, 1023, 1), (2, 512, 1024, 2), (2, 512, 4096, 2), (3, 9, 27, 3)],
)
def test_steps_are_cut_only_into_parts_of_at_least_the_minimum(most, min_tokens, num_tokens, expected):
    assert ModelRunner.micro_batches(num_tokens, most, min_tokens) == expected
