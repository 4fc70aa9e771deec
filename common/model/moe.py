"""DeepSeekMoE: a gate picks top-k of many fine-grained routed experts; shared experts see every token.

Gate variants (all scored in float32):
  * scoring: softmax (V2) or sigmoid (V3);
  * selection: greedy top-k; group_limited_greedy (V2: keep the `topk_group` groups with the best expert,
    a device-limited routing); noaux_tc (V3: groups ranked by the sum of their two best biased scores);
  * V3's `e_score_correction_bias` steers *selection* only; the combine weights are the unbiased scores;
  * norm_topk_prob renormalises the k weights; routed_scaling_factor scales them.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence

import torch
from torch import nn

from common.config import ModelConfig, cpu_has_native_bf16
from common.kernels import bf16_gemm, cpu_extension, grouped_experts, strips
from common.kernels.activation import silu_and_mul
from common.model.linear import DerivedWeight, matmul, pack


class MLP(nn.Module):
    """SwiGLU feed-forward (dense layers and shared experts); gate and up projections fused into one GEMM.
    Weights are input-major, [in, out], as in common/model/linear.py (and for the same reason)."""

    def __init__(self, hidden: int, intermediate: int) -> None:
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.empty(hidden, 2 * intermediate))
        self.down_proj = nn.Parameter(torch.empty(intermediate, hidden))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return matmul(silu_and_mul(matmul(x, self.gate_up_proj)), self.down_proj)

    def pack(self) -> None:
        """Once loaded (and after MoE.pack, which may take this MLP in among its experts): both weights in the
        layout their kernel reads best (common/model/linear.py's pack)."""
        self.gate_up_proj, self.down_proj = pack(self.gate_up_proj), pack(self.down_proj)

    def as_experts(self, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This MLP as intermediate // width experts of that intermediate width (w13 [n, h, 2 width], w2
        [n, width, h]), whose outputs sum to its own: a SwiGLU is a sum over its intermediate columns."""
        hidden, intermediate = self.down_proj.shape[1], self.down_proj.shape[0]
        n = intermediate // width
        gate, up = self.gate_up_proj.view(hidden, 2, n, width).unbind(1)
        w13 = torch.cat([gate, up], dim=-1).transpose(0, 1)
        return w13.contiguous(), self.down_proj.view(n, width, hidden)


_COUNTING = threading.Lock()


class Gate(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.num_experts = config.n_routed_experts
        self.method, self.scoring = config.topk_method, config.scoring_func
        self.n_group, self.topk_group = config.n_group, config.topk_group
        self.norm_topk_prob, self.scaling = config.norm_topk_prob, config.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(self.num_experts, config.hidden_size))
        self.register_buffer("e_score_correction_bias", None)
        # It scores in float32 whatever the dtype, with the weight input-major like every other product's.
        self._float_weight = DerivedWeight(lambda w: w.float().t().contiguous())
        self.counts: torch.Tensor | None = None  # int64 [experts], given: each step's choices added in
        self.reset_buffers()

    def reset_buffers(self) -> None:
        """V3's correction bias stays float32 whatever the serving dtype (as in the reference)."""
        if self.method == "noaux_tc":
            device = self.weight.device if self.weight.device.type != "meta" else None
            self.register_buffer("e_score_correction_bias", torch.zeros(self.num_experts, device=device))

    def kernel_args(self) -> tuple[object, ...]:
        """What csrc/moe_gate.cpp takes between x and the counts."""
        return (
            self._float_weight(self.weight),
            self.e_score_correction_bias,
            self.top_k,
            self.scoring,
            self.method,
            self.n_group,
            self.topk_group,
            self.norm_topk_prob,
            self.scaling,
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (weights float32 [T, k], expert ids int64 [T, k]), and adds the choices into self.counts
        if given; on CPU one C++ call (csrc/moe_gate.cpp) where the kernels run (its ids best first by the
        choice)."""
        if x.dim() == 2 and cpu_extension.runs(x):
            return cpu_extension.module().moe_gate(x, *self.kernel_args(), self.counts)
        weight = self._float_weight(self.weight)
        logits = x.float() @ weight
        scores = logits.softmax(dim=-1) if self.scoring == "softmax" else logits.sigmoid()
        choice = scores if self.e_score_correction_bias is None else scores + self.e_score_correction_bias
        if self.method != "greedy":
            grouped = choice.view(-1, self.n_group, self.num_experts // self.n_group)
            if self.method == "noaux_tc":
                group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)
            else:
                group_scores = grouped.amax(dim=-1)
            keep = torch.zeros_like(group_scores, dtype=torch.bool)
            keep.scatter_(1, group_scores.topk(self.topk_group, dim=-1, sorted=False).indices, True)
            choice = grouped.masked_fill(~keep[..., None], float("-inf")).view(-1, self.num_experts)
        ids = choice.topk(self.top_k, dim=-1, sorted=False).indices
        if self.counts is not None:
            with _COUNTING:  # micro-batches run a layer's gate side by side
                self.counts += torch.bincount(ids.flatten(), minlength=self.num_experts)
        weights = scores.gather(1, ids)
        if self.norm_topk_prob and self.top_k > 1:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return (weights if self.scaling == 1.0 else weights * self.scaling), ids


class RoutedExperts(nn.Module):
    """A shard of routed experts: all in-process, a contiguous or mapped subset on an expert worker."""

    def __init__(self, config: ModelConfig, expert_ids: Sequence[int] | None = None) -> None:
        super().__init__()
        self.expert_ids = list(range(config.n_routed_experts) if expert_ids is None else expert_ids)
        n, h, i = len(self.expert_ids), config.hidden_size, config.moe_intermediate_size
        self.w13 = nn.Parameter(torch.empty(n, h, 2 * i))  # input-major, as in common/model/linear.py
        self.w2 = nn.Parameter(torch.empty(n, i, h))
        self.num_global = config.n_routed_experts
        self.num_shared = 0  # shared experts packed after the routed ones (MoE.pack), taken by every token
        self.reset_buffers()

    def reset_buffers(self) -> None:
        # One extra trailing slot: id -1 ("computed by another shard") indexes it and maps to -1 too.
        local = torch.full((self.num_global + 1,), -1, dtype=torch.int64, device="cpu")
        local[torch.tensor(self.expert_ids, dtype=torch.int64, device="cpu")] = torch.arange(
            len(self.expert_ids), device="cpu"
        )
        self.register_buffer("global_to_local", local.to(self.w13.device), persistent=False)
        self.holds_all = self.expert_ids == list(range(self.num_global))  # global ids are local ids

    def forward(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Weighted sum of this shard's experts over the (token, expert) pairs routed to it: [T, h]."""
        local = ids if self.holds_all else self.global_to_local[ids]
        return grouped_experts.grouped_swiglu(x, local, weights, self.w13, self.w2, self.num_shared)

    @property
    def packed(self) -> bool:
        return strips.in_strip_order(self.w13)

    def pack(self, shared: MLP | None = None) -> None:
        """Keep w13 and w2 in strip order where the C++ call takes their products (decode reads them 1.3-1.4x
        faster so, common/kernels/grouped_experts.py), or in its tile order for AMX (bf16_gemm.kernel_order):
        once the weights are loaded, in place of the checkpoint's layout, which a packed shard no longer
        takes. A layer's `shared` experts, given, join the shard after the routed ones, as experts of the
        same width (MLP.as_experts); on a CPU with bfloat16 units but not in tile order they stay [K, N]
        beside, as `shared_rows_major` of w13 and w2, for more rows than the bfloat16 kernel's MAX_ROWS
        (common/kernels/grouped_experts.py)."""
        if self.packed or not grouped_experts.takes(self.w13):
            return
        w13, w2 = self.w13, self.w2
        if shared is not None:
            shared_w13, shared_w2 = shared.as_experts(w2.shape[1])
            w13, w2 = torch.cat([w13, shared_w13]), torch.cat([w2, shared_w2])
            self.num_shared = shared_w2.shape[0]
        with torch.no_grad():
            self.w13 = nn.Parameter(bf16_gemm.kernel_order(w13), requires_grad=False)
            self.w2 = nn.Parameter(bf16_gemm.kernel_order(w2), requires_grad=False)
        kept = w13.dtype is torch.bfloat16 and cpu_has_native_bf16() and not strips.in_tile_order(self.w13)
        if shared is not None and kept:  # grouped_swiglu
            self.w13.shared_rows_major = shared_w13
            self.w2.shared_rows_major = shared_w2

    def submit(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> Callable[[], torch.Tensor]:
        """forward() as a deferred result (remote experts compute while the caller goes on)."""
        out = self(x, weights, ids)
        return lambda: out


class MoE(nn.Module):
    """Gate + routed experts + shared experts. `experts` is anything with RoutedExperts' forward and submit,
    so the same layer runs with local experts or with remote expert shards."""

    def __init__(self, config: ModelConfig, expert_ids: Sequence[int] | None = None) -> None:
        super().__init__()
        self.gate = Gate(config)
        self.experts = RoutedExperts(config, expert_ids)
        self.shared_experts = (
            MLP(config.hidden_size, config.moe_intermediate_size * config.n_shared_experts)
            if config.n_shared_experts
            else None
        )

    def pack(self) -> None:
        """Once loaded: the routed experts in their kernel's layout (RoutedExperts.pack). Where this process
        holds them all, the shared experts join them (SGLang's shared-experts fusion): a layer's experts are
        then one call, where a one-sequence decode step made four more (two GEMMs, the activation, the add)
        and read the shared weights more slowly than the routed ones in strip order."""
        experts, shared = self.experts, self.shared_experts
        fuse = (
            shared is not None
            and experts.holds_all
            and not experts.packed
            and shared.down_proj.shape[0] % experts.w2.shape[1] == 0
        )
        experts.pack(shared if fuse else None)
        if experts.num_shared:
            self.shared_experts = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, ids = self.gate(x)
        routed = self.experts.submit(x, weights, ids)  # remote shards compute while the shared experts run
        if self.shared_experts is None:
            return routed()
        shared = self.shared_experts(x)
        return shared.add_(routed())
