"""Which instruction set the C++ kernels are built for (common/kernels/cpu_extension.py), on any CPU."""

import pytest

from common import config
from common.kernels import cpu_extension

AVX512 = {"avx512f", "avx512bw", "avx512vl"}


@pytest.mark.parametrize(
    ("flags", "want"),
    [
        (AVX512 | {"avx2", "fma", "sse4_2"}, ["-mavx512f", "-mavx512bw", "-mavx512vl"]),  # the best first
        ({"avx2", "fma", "f16c"}, ["-mavx2", "-mfma"]),  # Zen 1-3, Haswell to Comet Lake
        ({"avx512f", "avx2", "fma"}, ["-mavx2", "-mfma"]),  # AVX-512 without BW/VL (Knights Landing)
        ({"avx2"}, None),  # AVX2 without FMA: no build, torch's path
        ({"sse4_2", "avx"}, None),
        (set(), None),  # no /proc/cpuinfo
    ],
)
def test_kernels_build_for_the_best_instruction_set_the_cpu_has(monkeypatch, flags, want) -> None:
    monkeypatch.setattr(config, "cpu_flags", lambda: frozenset(flags))
    assert cpu_extension.isa_flags() == want
