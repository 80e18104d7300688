"""Sibling dynamic int8 layers that read the same input (an attention block's query / key / value, a gated MLP's
gate / up) run as one oneDNN GEMM with one activation quantization, in eager mode.

Why: at MiniLM's sizes an eager dynamic int8 layer's time is mostly the fixed cost of the small ops around its GEMM
(quantizing the activations, the rescale); three projections of one input pay it three times. Fused, the input is
quantized once and one GEMM writes the members' outputs side by side: the same codes, the same int32 sums and the
same per-column rescale as separate calls, so the numbers are bit-identical (tested).

How the members meet: the first member called computes every member's output and keeps the others', with a
reference to the input (so its memory cannot be handed to another tensor meanwhile). A member called next on that
same input (same storage, shape, strides, dtype and version counter) takes its output, once; any other call
computes afresh. What this cannot see is an inference-mode tensor edited in place between two members' calls
(inference tensors have no version counter); no transformers attention or MLP does that.
"""

from __future__ import annotations

import torch

from fabric_quant.nn.onednn_linear import KernelCache, _version, dynamic_int8_linear, packed_weight

SIBLING_NAMES = (("query", "key", "value"), ("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


class SiblingGroup:
    """The members (``Int8Linear`` layers of one parent, one input width) and their fused packed weight."""

    def __init__(self, members: list[torch.nn.Module]) -> None:
        self.members = members
        self._reset()

    def _reset(self) -> None:
        self.kernel = KernelCache()
        self.pending: dict[int, tuple[tuple, torch.Tensor]] = {}
        self.input: torch.Tensor | None = None

    def __getstate__(self) -> dict:  # copies (deepcopy, pickle) start with no derived or pending state
        return {"members": self.members}

    def __setstate__(self, state: dict) -> None:
        self.members = state["members"]
        self._reset()

    def run(self, layer: torch.nn.Module, rows: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        index = next(i for i, m in enumerate(self.members) if m is layer)
        key = (rows.data_ptr(), tuple(rows.shape), rows.stride(), rows.dtype, _version(rows), dtype)
        hit = self.pending.pop(index, None)
        if not self.pending:
            self.input = None
        if hit is not None and hit[0] == key:
            return hit[1]
        packed, w_scale, bias = self._packed()
        out = dynamic_int8_linear(rows.contiguous(), packed, w_scale, bias, dtype)
        outs = out.split([m.out_features for m in self.members], dim=1)
        self.pending = {i: (key, o) for i, o in enumerate(outs) if i != index}
        self.input = rows
        return outs[index]

    def _packed(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        packed, w_scale = packed_weight(self.kernel, self.members)
        key = tuple((m.bias.data_ptr(), _version(m.bias)) for m in self.members if m.bias is not None)
        if self.kernel.get("bias_key") != key:
            parts = [torch.zeros(m.out_features) if m.bias is None else m.bias.detach().float() for m in self.members]
            self.kernel["bias"] = torch.cat(parts) if key else None  # None: no member has a bias
            self.kernel["bias_key"] = key
        return packed, w_scale, self.kernel["bias"]


def group_int8_siblings(model: torch.nn.Module) -> int:
    """Group the dynamic int8 siblings of ``model`` (names in ``SIBLING_NAMES`` under one parent, the same input
    width, no fused ReLU, per-channel or per-tensor scales); returns how many groups were made."""
    from fabric_quant.nn.int8 import Int8Linear

    made = 0
    for parent in model.modules():
        for names in SIBLING_NAMES:
            members = [getattr(parent, n, None) for n in names]
            if not all(type(m) is Int8Linear for m in members):
                continue
            if not all(m.activations == "dynamic" and m.group_size is None and not m.relu for m in members):
                continue
            if len({m.in_features for m in members}) != 1:
                continue
            group = SiblingGroup(members)
            for m in members:
                m._siblings = group
            made += 1
    return made
