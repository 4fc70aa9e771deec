"""Sampler and SamplingParams: exact greedy, filters, distributions, seeding, logprobs, validation."""

import pytest
import torch

from common.engine.sampler import Sampler
from common.engine.sampling_params import SamplingParams

sampler = Sampler()


@pytest.fixture(autouse=True)
def _fixed_default_rng():
    """Unseeded rows draw from torch's default generator: pin it per test, without leaking the state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        yield


def randn(*shape: int, seed: int, scale: float = 3.0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


def sample(logits: torch.Tensor, params: list[SamplingParams], generators=None):
    return sampler(logits, params, generators or [None] * len(params))


# ---- greedy ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_greedy_is_exactly_argmax(dtype):
    logits = randn(16, 1000, seed=0).to(dtype)
    out = sample(logits, [SamplingParams(temperature=0)] * 16)
    assert out.token_ids.dtype == torch.int64
    assert torch.equal(out.token_ids, logits.argmax(dim=-1))
    assert out.logprobs is None and out.top_ids is None and out.top_logprobs is None


def test_greedy_ties_pick_the_lowest_id():
    logits = torch.zeros(3, 10, dtype=torch.bfloat16)
    logits[0, [7, 3, 9]] = 1.0
    logits[2, [5, 6]] = -1.0
    out = sample(logits, [SamplingParams(temperature=0)] * 3)
    assert out.token_ids.tolist() == [3, 0, 0]


def test_greedy_rows_stay_exact_in_a_mixed_batch():
    logits = randn(8, 500, seed=1).to(torch.bfloat16)
    params = [
        SamplingParams(temperature=0 if i % 2 else 1.3, top_k=5 * i, top_p=0.9, logprobs=2) for i in range(8)
    ]
    out = sample(logits, params)
    assert torch.equal(out.token_ids[1::2], logits[1::2].argmax(dim=-1))


def test_near_zero_temperature_is_greedy():
    assert SamplingParams(temperature=1e-6).greedy and not SamplingParams(temperature=0.01).greedy
    logits = randn(4, 300, seed=2)
    out = sample(logits, [SamplingParams(temperature=1e-6)] * 4)
    assert torch.equal(out.token_ids, logits.argmax(dim=-1))


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(top_k=1),
        SamplingParams(top_p=1e-6),
        SamplingParams(top_p=1e-9),
        SamplingParams(min_p=1),
    ],
    ids=["top_k=1", "top_p=1e-6", "top_p=1e-9", "min_p=1"],
)
def test_degenerate_filters_are_greedy(params):
    for seed in range(5):
        logits = randn(32, 400, seed=seed)
        out = sample(logits, [params] * 32)
        assert torch.equal(out.token_ids, logits.argmax(dim=-1))


# ---- distributions -----------------------------------------------------------------------------------------

LOGITS = torch.tensor([0.5, 0.3, 0.15, 0.05]).log()  # probabilities that make filters easy to reason about
N = 40_000


def frequencies(params: SamplingParams) -> torch.Tensor:
    return histogram(sample(LOGITS.expand(N, -1), [params] * N).token_ids)


def histogram(tokens: torch.Tensor) -> torch.Tensor:
    return torch.bincount(tokens, minlength=LOGITS.numel()).double() / tokens.numel()


def assert_distributed_as(freq: torch.Tensor, expected: torch.Tensor, n: int = N) -> None:
    """Tokens outside the support never appear; the chi-square statistic is below the 0.1% critical value."""
    expected = expected.double() / expected.sum()
    assert torch.all(freq[expected == 0] == 0), (freq, expected)
    support = expected > 0
    chi2 = (n * (freq[support] - expected[support]) ** 2 / expected[support]).sum().item()
    assert chi2 < 20.0, (chi2, freq, expected)  # df <= 3: the 0.1% critical value is 16.3; seeds are fixed


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_temperature_scales_the_distribution(temperature):
    expected = (LOGITS / temperature).softmax(0)
    assert_distributed_as(frequencies(SamplingParams(temperature=temperature)), expected)


def test_temperature_changes_the_distribution():
    cold, hot = frequencies(SamplingParams(temperature=0.5)), frequencies(SamplingParams(temperature=2.0))
    assert cold[0] > 0.6 > 0.5 > 0.4 > hot[0]


def test_top_k_renormalises_over_the_k_best():
    assert_distributed_as(frequencies(SamplingParams(top_k=2)), torch.tensor([0.5, 0.3, 0, 0]))


def test_top_p_keeps_the_smallest_nucleus_reaching_p():
    assert_distributed_as(frequencies(SamplingParams(top_p=0.75)), torch.tensor([0.5, 0.3, 0, 0]))
    assert_distributed_as(frequencies(SamplingParams(top_p=0.85)), torch.tensor([0.5, 0.3, 0.15, 0]))


def test_min_p_drops_tokens_below_a_fraction_of_the_best():
    assert_distributed_as(frequencies(SamplingParams(min_p=0.25)), torch.tensor([0.5, 0.3, 0.15, 0]))
    assert_distributed_as(frequencies(SamplingParams(min_p=0.5)), torch.tensor([0.5, 0.3, 0, 0]))


def test_filters_apply_after_temperature():
    expected = (LOGITS / 2.0).softmax(0) * torch.tensor([1, 1, 1, 0])
    assert_distributed_as(frequencies(SamplingParams(temperature=2.0, top_k=3)), expected)


def test_each_row_gets_its_own_filters():
    """Filters are vectorised with per-row parameters: a row's neighbours never change its distribution."""
    cases = [
        (SamplingParams(top_k=2), [0.5, 0.3, 0, 0]),
        (SamplingParams(), [0.5, 0.3, 0.15, 0.05]),
        (SamplingParams(top_p=0.75), [0.5, 0.3, 0, 0]),
        (SamplingParams(min_p=0.25), [0.5, 0.3, 0.15, 0]),
    ]
    tokens = sample(LOGITS.expand(N, -1), [params for params, _ in cases] * (N // 4)).token_ids
    for row, (_, probs) in enumerate(cases):
        assert_distributed_as(histogram(tokens[row::4]), torch.tensor(probs), n=N // 4)


def test_per_row_filters_in_one_batch():
    """Every row honours its own top_k / top_p / min_p, however its neighbours are configured."""
    logits = randn(1, 50, seed=3).expand(600, -1)
    ranked = logits[0].argsort(descending=True).tolist()
    params = [
        SamplingParams(top_k=1 + i % 7, top_p=0.99 + i % 3 / 200, min_p=i % 2 / 100) for i in range(600)
    ]
    for _ in range(5):
        out = sample(logits, params)
        for p, token in zip(params, out.token_ids.tolist(), strict=True):
            assert token in ranked[: p.top_k]


# ---- seeding -----------------------------------------------------------------------------------------------

STEPS, VOCAB = 8, 300
REQUEST = SamplingParams(temperature=0.9, top_k=60, top_p=0.95, seed=1234)
STEP_LOGITS = randn(STEPS, VOCAB, seed=4, scale=1.0)  # the request's logits per step (flat: sampling matters)


def run_request(mates: list[SamplingParams], position) -> list[int]:
    """Decode REQUEST for STEPS steps among `mates`, at row position(step); return its tokens."""
    generator = torch.Generator().manual_seed(REQUEST.seed)
    mate_generators = [torch.Generator().manual_seed(p.seed) if p.seed is not None else None for p in mates]
    tokens = []
    for step in range(STEPS):
        row = position(step) % (len(mates) + 1)
        params = mates[:row] + [REQUEST] + mates[row:]
        generators = mate_generators[:row] + [generator] + mate_generators[row:]
        logits = randn(len(params), VOCAB, seed=100 + step, scale=1.0)
        logits[row] = STEP_LOGITS[step]
        tokens.append(sampler(logits, params, generators).token_ids[row].item())
    return tokens


def test_seeded_request_is_reproducible_in_any_batch():
    alone = run_request([], lambda step: 0)
    mates = [
        SamplingParams(),
        SamplingParams(temperature=0),
        SamplingParams(temperature=0.7, seed=1234),  # same seed, own generator
        SamplingParams(temperature=1.5, min_p=0.05, logprobs=3),
        SamplingParams(top_k=5, seed=7),
    ]
    assert run_request(mates[:2], lambda step: 1) == alone
    assert run_request(mates, lambda step: step) == alone
    assert run_request(mates[::-1], lambda step: 3 * step + 2) == alone
    assert run_request([SamplingParams(temperature=0.9)] * 40, lambda step: 39 - step) == alone
    assert alone != STEP_LOGITS.argmax(dim=-1).tolist(), "the test must exercise actual sampling"


def test_different_seeds_give_different_tokens():
    logits = randn(1, VOCAB, seed=5, scale=0.1).expand(2, -1)
    params = [SamplingParams(seed=1), SamplingParams(seed=2)]
    generators = [torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)]
    tokens = [sampler(logits, params, generators).token_ids.tolist() for _ in range(10)]
    assert any(a != b for a, b in tokens)


# ---- logprobs ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_logprobs_are_raw_log_softmax_at_the_sampled_ids(dtype):
    logits = randn(6, 200, seed=6).to(dtype)
    params = [
        SamplingParams(temperature=0, logprobs=1),
        SamplingParams(temperature=0.5, top_k=10, logprobs=5),
        SamplingParams(temperature=2.0, top_p=0.5, logprobs=0),
        SamplingParams(min_p=0.2),
        SamplingParams(temperature=0),
        SamplingParams(logprobs=3),
    ]
    out = sample(logits, params)
    raw = logits.float().log_softmax(dim=-1)
    assert out.logprobs.dtype == torch.float32 and out.top_logprobs.dtype == torch.float32
    torch.testing.assert_close(out.logprobs, raw.gather(-1, out.token_ids[:, None]).squeeze(-1))
    best = raw.topk(5, dim=-1)
    assert out.top_ids.shape == (6, 5) and out.top_ids.dtype == torch.int64
    assert torch.equal(out.top_ids, best.indices)
    torch.testing.assert_close(out.top_logprobs, best.values)
    torch.testing.assert_close(out.top_logprobs, raw.gather(-1, out.top_ids))


def test_logprobs_zero_gives_no_alternatives():
    out = sample(randn(2, 50, seed=7), [SamplingParams(logprobs=0), SamplingParams()])
    assert out.logprobs.shape == (2,) and out.top_ids is None and out.top_logprobs is None


def test_more_alternatives_than_vocab_are_clamped():
    out = sample(randn(1, 4, seed=8), [SamplingParams(temperature=0, logprobs=10)])
    assert out.top_ids.shape == (1, 4)


def test_batch_size_mismatch_is_rejected():
    with pytest.raises(ValueError, match="batch size"):
        sampler(randn(2, 10, seed=9), [SamplingParams()], [None])


# ---- SamplingParams ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, value",
    [
        ("n", 0),
        ("n", 2.0),
        ("temperature", -0.5),
        ("temperature", float("nan")),
        ("temperature", "hot"),
        ("top_p", 0.0),
        ("top_p", 1.5),
        ("top_k", -2),
        ("top_k", 2.5),
        ("min_p", -0.1),
        ("min_p", 1.1),
        ("seed", -1),
        ("seed", 2**64),
        ("seed", "42"),
        ("max_tokens", 0),
        ("max_tokens", True),
        ("stop_token_ids", [1, -1]),
        ("stop_token_ids", 2),
        ("stop", [1, 2]),
        ("stop", 5),
        ("stop", None),
        ("stop", ["ok", ""]),
        ("ignore_eos", 1),
        ("logprobs", -1),
        ("logprobs", True),
        ("skip_special_tokens", "yes"),
        ("include_stop_str_in_output", None),
    ],
)
def test_invalid_sampling_params_name_the_field(name, value):
    with pytest.raises(ValueError, match=rf"^{name} must be .*, got "):
        SamplingParams(**{name: value})


def test_invalid_messages_state_the_allowed_range():
    with pytest.raises(ValueError) as e:
        SamplingParams(top_p=1.5)
    assert str(e.value) == "top_p must be in (0, 1], got 1.5"
    with pytest.raises(ValueError) as e:
        SamplingParams(stop=[1, 2])
    assert str(e.value) == "stop must be a string or a list of strings, got [1, 2]"


def test_sampling_params_normalise_their_input():
    ids = [2, 3]
    p = SamplingParams(temperature=1, stop="###", stop_token_ids=ids, top_k=-1)
    ids.append(4)
    assert p.stop == ["###"] and p.stop_token_ids == [2, 3] and isinstance(p.temperature, float)
    assert SamplingParams(stop=("a", "b")).stop == ["a", "b"]


def test_from_dict():
    p = SamplingParams.from_dict({"temperature": 0, "stop": "##", "seed": 5, "top_p": None, "logprobs": None})
    assert p.greedy and p.stop == ["##"] and p.seed == 5 and p.top_p == 1.0 and p.logprobs is None
    assert SamplingParams.from_dict({}) == SamplingParams()
    with pytest.raises(ValueError, match="unknown sampling parameter.*bogus.*frequency_penalty"):
        SamplingParams.from_dict({"temperature": 1.0, "frequency_penalty": 0.1, "bogus": 1})
    with pytest.raises(ValueError, match="max_tokens must be"):
        SamplingParams.from_dict({"max_tokens": -3})
    with pytest.raises(ValueError, match="must be an object"):
        SamplingParams.from_dict([("temperature", 1.0)])
