"""Tensors on the wire as (dtype, shape, raw little-endian bytes): any language can read them, nothing is
pickled, and a malformed message is a ValueError naming what is wrong.

A prefill chunk's hidden states are megabytes, and every copy of them costs the router time in which the
workers wait: a tensor is written straight into the request's own field (`out`), not built apart and copied
in, and its bytes are read out of a message once."""

from __future__ import annotations

import torch

from latentmoe.v1 import tensor_pb2

_DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int64": torch.int64,
    "int32": torch.int32,
    "int16": torch.int16,
    "uint8": torch.uint8,
    "bool": torch.bool,
}
_NAMES = {v: k for k, v in _DTYPES.items()}


def tensor_to_proto(t: torch.Tensor, out: tensor_pb2.Tensor | None = None) -> tensor_pb2.Tensor:
    """`t` as a Tensor message, written into `out` (e.g. `request.hidden`) when given."""
    if t.dtype not in _NAMES:
        raise ValueError(f"dtype {t.dtype} cannot be sent")
    flat = t.detach().to("cpu").contiguous().reshape(-1)
    msg = tensor_pb2.Tensor() if out is None else out
    msg.dtype = _NAMES[t.dtype]
    msg.shape[:] = t.shape
    msg.data = flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b""
    return msg


def tensor_from_proto(msg: tensor_pb2.Tensor, device: str | torch.device = "cpu") -> torch.Tensor:
    dtype = _DTYPES.get(msg.dtype)
    if dtype is None:
        raise ValueError(f"tensor dtype {msg.dtype!r} is not one of {sorted(_DTYPES)}")
    shape = list(msg.shape)
    if any(d < 0 for d in shape):
        raise ValueError(f"tensor shape {shape} has a negative dimension")
    numel = 1
    for d in shape:
        numel *= d
    itemsize = torch.empty(0, dtype=dtype).element_size()
    data = msg.data  # each read of a bytes field copies it
    if len(data) != numel * itemsize:
        raise ValueError(
            f"tensor of shape {shape} and dtype {msg.dtype} needs {numel * itemsize} bytes, got {len(data)}"
        )
    if numel == 0:
        return torch.empty(shape, dtype=dtype, device=device)
    raw = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    return raw.view(dtype).reshape(shape).to(device)
