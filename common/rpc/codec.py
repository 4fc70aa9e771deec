"""Tensors on the wire as (dtype, shape, raw little-endian bytes): any language can read them, nothing is
pickled, and a malformed message is a ValueError naming what is wrong."""

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


def tensor_to_proto(t: torch.Tensor) -> tensor_pb2.Tensor:
    if t.dtype not in _NAMES:
        raise ValueError(f"dtype {t.dtype} cannot be sent")
    flat = t.detach().to("cpu").contiguous().reshape(-1)
    data = flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b""
    return tensor_pb2.Tensor(dtype=_NAMES[t.dtype], shape=list(t.shape), data=data)


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
    if len(msg.data) != numel * itemsize:
        raise ValueError(
            f"tensor of shape {shape} and dtype {msg.dtype} needs {numel * itemsize} bytes, "
            f"got {len(msg.data)}"
        )
    if numel == 0:
        return torch.empty(shape, dtype=dtype, device=device)
    raw = torch.frombuffer(bytearray(msg.data), dtype=torch.uint8)
    return raw.view(dtype).reshape(shape).to(device)
