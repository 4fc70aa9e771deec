"""Physical pages of the MLA latent KV cache.

Per token and layer MLA caches one entry of width ``entry_dim = kv_lora_rank + qk_rope_head_dim`` (the latent
``c_kv`` followed by the roped ``k_pe``). All layers share one block id space (the BlockManager is
layer-agnostic), so the whole cache is a single tensor ``[num_layers, num_blocks, block_size, entry_dim]`` and
moving a block (copy-on-write, transfer to/from the KV-cache service) is one indexed op across all layers.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch

from common.kvcache.block_manager import DEFAULT_BLOCK_SIZE, validate_block_size

__all__ = ["DEFAULT_BLOCK_SIZE", "BlockPool", "free_memory_bytes"]


def free_memory_bytes(device: str | torch.device = "cpu") -> int:
    """Free memory on `device`: what a fractional KV-cache budget is a fraction of."""
    dev = torch.device(device)
    if dev.type == "cuda":
        free, _total = torch.cuda.mem_get_info(dev)
        return int(free)
    if dev.type not in ("cpu", "mps"):  # mps shares host memory
        raise ValueError(f"cannot measure free memory on {dev.type!r}; give the KV-cache budget in bytes")
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024  # reported in kB
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        raise ValueError("cannot measure free host memory; give the KV-cache budget in bytes") from None


class BlockPool:
    """Physical latent pages for all layers: ``layer(l)`` is ``[num_blocks, block_size, entry_dim]``."""

    def __init__(
        self,
        num_layers: int,
        num_blocks: int,
        block_size: int,
        entry_dim: int,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
    ) -> None:
        for name, value in (("num_layers", num_layers), ("num_blocks", num_blocks), ("entry_dim", entry_dim)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        self.num_layers = num_layers
        self.num_blocks = num_blocks
        self.block_size = validate_block_size(block_size)
        self.entry_dim = entry_dim
        self.dtype = dtype
        self.device = torch.device(device)
        # Zero-initialised so never-written slots read as zeros, not garbage (reproducible padding reads).
        self.pages = torch.zeros(
            num_layers, num_blocks, block_size, entry_dim, dtype=dtype, device=self.device
        )
        # Each layer's views, made once: a decode step writes and reads every layer, and on CPU each view
        # made on the way costs a few microseconds.
        self._layers = self.pages.unbind(0)
        self._slots = [pages.view(-1, entry_dim) for pages in self._layers]  # slot = block * size + offset

    # ------------------------------------------------------------------ per-layer token access

    def layer(self, layer: int) -> torch.Tensor:
        """View ``[num_blocks, block_size, entry_dim]`` of one layer: what paged attention reads."""
        return self._layers[layer]

    def _slot_ids(self, slots: torch.Tensor) -> torch.Tensor:
        if slots.dim() == 1 and slots.dtype == torch.long and slots.device == self.device:
            return slots
        return slots.reshape(-1).to(device=self.device, dtype=torch.long)

    def write(self, layer: int, slot_mapping: torch.Tensor, entries: torch.Tensor) -> None:
        """Scatter new tokens' entries ``[T, entry_dim]`` into their slots ``[T]`` of one layer."""
        if (
            entries.dim() != 2
            or entries.shape[1] != self.entry_dim
            or entries.shape[0] != slot_mapping.numel()
        ):
            raise ValueError(
                f"entries must be [{slot_mapping.numel()}, {self.entry_dim}] to match slot_mapping, "
                f"got {list(entries.shape)}"
            )
        if entries.dtype != self.dtype or entries.device != self.device:
            entries = entries.to(device=self.device, dtype=self.dtype)
        self._slots[layer].index_copy_(0, self._slot_ids(slot_mapping), entries)

    def gather(self, layer: int, slots: torch.Tensor) -> torch.Tensor:
        """Entries ``[T, entry_dim]`` at the given slots of one layer (a copy)."""
        return self._slots[layer].index_select(0, self._slot_ids(slots))

    # ------------------------------------------------------------------ whole-block access (all layers)

    def _ids(self, block_ids: Sequence[int] | torch.Tensor) -> torch.Tensor:
        return torch.as_tensor(block_ids, dtype=torch.long, device=self.device).reshape(-1)

    def copy_blocks(self, pairs: Sequence[tuple[int, int]]) -> None:
        """Copy-on-write: page src -> page dst in every layer, all pairs in one gather + one scatter."""
        if not pairs:
            return
        src, dst = zip(*pairs, strict=True)
        # index_select copies first, so the sources are read before any destination is written.
        self.pages.index_copy_(1, self._ids(dst), self.pages.index_select(1, self._ids(src)))

    def read_blocks(self, block_ids: Sequence[int] | torch.Tensor) -> torch.Tensor:
        """``[num_layers, n, block_size, entry_dim]`` copy of the blocks (transfer to the KV service)."""
        return self.pages.index_select(1, self._ids(block_ids))

    def write_blocks(self, block_ids: Sequence[int] | torch.Tensor, data: torch.Tensor) -> None:
        """Overwrite whole blocks in every layer (transfer from the KV service)."""
        ids = self._ids(block_ids)
        expected = (self.num_layers, ids.numel(), self.block_size, self.entry_dim)
        if tuple(data.shape) != expected:
            raise ValueError(f"data must be {list(expected)}, got {list(data.shape)}")
        self.pages.index_copy_(1, ids, data.to(device=self.device, dtype=self.dtype))

    # ------------------------------------------------------------------ sizing

    @property
    def nbytes(self) -> int:
        return self.pages.numel() * self.pages.element_size()

    @property
    def capacity_tokens(self) -> int:
        return self.num_blocks * self.block_size

    @staticmethod
    def bytes_per_block(num_layers: int, block_size: int, entry_dim: int, dtype: torch.dtype) -> int:
        """Bytes one block id costs: its page in every layer."""
        return num_layers * validate_block_size(block_size) * entry_dim * dtype.itemsize

    @classmethod
    def num_blocks_for_budget(
        cls,
        budget: int | float,
        num_layers: int,
        block_size: int,
        entry_dim: int,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
    ) -> int:
        """Blocks that fit in `budget`: int bytes, or a float in (0, 1] = fraction of free device memory."""
        per_block = cls.bytes_per_block(num_layers, block_size, entry_dim, dtype)
        if isinstance(budget, bool) or not isinstance(budget, int | float):
            raise ValueError(f"budget must be int bytes or a float fraction in (0, 1], got {budget!r}")
        if isinstance(budget, float):
            if not 0.0 < budget <= 1.0:
                raise ValueError(f"a fractional budget must be in (0, 1], got {budget}")
            free = free_memory_bytes(device)
            nbytes, what = int(free * budget), f"{budget:g} of the {free} free bytes on {device}"
        else:
            if budget <= 0:
                raise ValueError(f"a byte budget must be > 0, got {budget}")
            nbytes, what = budget, "the given budget"
        num_blocks = nbytes // per_block
        if num_blocks < 1:
            raise ValueError(
                f"KV-cache budget of {nbytes} bytes ({what}) holds no block: one block of {block_size} "
                f"tokens x {num_layers} layers x {entry_dim} x {dtype} needs {per_block} bytes"
            )
        return num_blocks
