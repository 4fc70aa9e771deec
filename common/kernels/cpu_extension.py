"""The C++ kernels for CPU (csrc/), built into one extension by torch's loader on first use.

On CPU a decode step is mostly small operators, each paying microseconds of dispatch, so how many run
matters as much as how fast each is: in torch a RMSNorm is eight operators, a rotary embedding twelve, the
paged latent decode about forty per layer, the routed experts twenty, the prefill attention a dozen per
sequence. These kernels do each in one call, in float32 arithmetic like the torch code they replace, which
stays the reference and the path elsewhere:
  * bf16_gemm.cpp: bfloat16 weights times a few rows (common/kernels/bf16_gemm.py), on AVX-512 or AVX2
    FMAs (gemm_strips.h, gemm_packed.h) or AMX's tiles (gemm_amx.h), and on its grouped product (which
    takes float32 weights too) grouped_experts.cpp: the routed experts of a layer
    (common/kernels/grouped_experts.py);
  * varlen_attention.cpp and paged_decode.cpp: MLA prefill attention over packed sequences and absorbed
    decode over the paged latents (common/kernels/cpu_attention.py);
  * norm_rope.cpp: RMSNorm (common/model/norm.py) and the rotary embedding (common/model/rope.py);
  * moe_gate.cpp: the MoE gate's scores and top-k choice (common/model/moe.py);
  * mla.cpp: MLA's queries, cache entries and absorbed output, each a composition of the above and ATen's
    matmul (common/model/mla.py);
  * activation.cpp: the SwiGLU activation, silu(gate) * up (common/kernels/activation.py);
  * decode_layer.cpp: a decoder layer of a decode step as one call of the above, weights bound once
    (common/engine/decode_graph.py).

The build (about a minute on two cores, cached per machine) needs a compiler and a CPU with AVX-512 (F, BW,
VL) or AVX2 with FMA: the kernels are written once over csrc/simd.h's 16-lane vector, one AVX-512 register
or two AVX2 ones, and built for the best the CPU has; with AMX, also for its tiles. Where they cannot run,
`available()` is False and every caller keeps its torch path.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import tempfile
from pathlib import Path
from types import ModuleType

import torch

log = logging.getLogger(__name__)
SOURCE_DIR = Path(__file__).parent / "csrc"
FLAGS = ["-O3", "-fopenmp"]
# The instruction sets the kernels are built for, best first: the CPU flags each needs and the compiler's.
# AMX's tiles come on top of AVX-512 (csrc/gemm_amx.h); the kernels ask the OS for them when first used.
ISAS = (
    (
        {"avx512f", "avx512bw", "avx512vl", "amx_tile", "amx_bf16"},
        ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mamx-tile", "-mamx-bf16"],
    ),
    ({"avx512f", "avx512bw", "avx512vl"}, ["-mavx512f", "-mavx512bw", "-mavx512vl"]),
    ({"avx2", "fma"}, ["-mavx2", "-mfma"]),
)


def isa_flags() -> list[str] | None:
    """The compiler flags of the best instruction set this CPU has for the kernels, None if it has none."""
    from common.config import cpu_flags

    return next((flags for needs, flags in ISAS if cpu_flags() >= needs), None)


def _build_sources(flags: list[str]) -> tuple[str, list[Path]]:
    """The extension's name and its sources, copied under a directory named by their contents: the build
    then does not depend on where the code lives (a Ray job runs a copy of it elsewhere), so every copy of
    the same code finds the same build instead of rebuilding it."""
    from torch.utils.cpp_extension import _get_build_directory

    files = sorted(SOURCE_DIR.glob("*.cpp")) + sorted(SOURCE_DIR.glob("*.h"))
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    digest.update(" ".join(flags).encode())
    name = f"latentmoe_cpu_{digest.hexdigest()[:16]}"
    copies = Path(_get_build_directory(name, verbose=False)) / "src"
    copies.mkdir(parents=True, exist_ok=True)
    for path in files:
        if not (copies / path.name).exists():  # named by content: a file there is this file
            with tempfile.NamedTemporaryFile(dir=copies, delete=False) as tmp:
                tmp.write(path.read_bytes())
            os.replace(tmp.name, copies / path.name)
    return name, [copies / path.name for path in files if path.suffix == ".cpp"]


@functools.cache
def module() -> ModuleType | None:
    isa = isa_flags()
    if isa is None:
        return None
    flags = FLAGS + isa
    try:
        from torch.utils.cpp_extension import load

        name, sources = _build_sources(flags)
        return load(name, [str(s) for s in sources], extra_cflags=flags, extra_ldflags=["-fopenmp"])
    except Exception as e:  # no compiler, a failed build: torch's path still works
        log.warning("CPU kernels unavailable (%s): torch's operators run instead", e)
        return None


def available() -> bool:
    """Whether the kernels run on this machine (builds them on the first call)."""
    return module() is not None


def runs(x: torch.Tensor) -> bool:
    """Whether a kernel should take x: a float32 or bfloat16 CPU tensor, no gradient wanted, kernels built."""
    return (  # cheapest tests first: a decode step asks this a few dozen times
        x.is_cpu
        and (x.dtype is torch.float32 or x.dtype is torch.bfloat16)
        and not (x.requires_grad and torch.is_grad_enabled())
        and available()
    )
