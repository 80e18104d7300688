"""Llama-family RMSNorm and SwiGLU product that keep only their inputs for the backward pass.

Why: transformers' ``LlamaRMSNorm`` computes in fp32, so autograd keeps an fp32 copy of its input (twice the bytes
of the bf16 input the block holds anyway), and ``LlamaMLP`` computes ``act_fn(gate) * up``, so autograd keeps the
activation's output besides ``gate`` and ``up`` (one more intermediate-sized tensor per block). With a 4-bit base
whose matmul keeps no activation (fabric_quant.nn.four_bit_matmul) these are a large share of what a recomputed
block holds at once: at the 1B Llama shape with 512 tokens, two 4.2 MB fp32 norm inputs and one 8.4 MB activation
output, held where a sharded QLoRA step peaked (docs/fsdp.md). Here each runs under a non-reentrant
``torch.utils.checkpoint``: the same operations recomputed in the backward from the inputs, so outputs and
gradients are transformers' to the bit.

Applied to a module only when its ``forward`` is transformers' Llama code (compared by bytecode): the copies other
model families make of it (Mistral, Qwen2, ...) qualify, variants with other arithmetic (Gemma's ``1 + weight``) do
not.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


def _same_code(a, b) -> bool:
    a, b = getattr(a, "__code__", None), b.__code__
    return a is not None and (a.co_code, a.co_names, a.co_consts) == (b.co_code, b.co_names, b.co_consts)


def _act_times_up(act_fn, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return act_fn(gate) * up


def _recomputed(fn, *args):
    """``fn(*args)``, recomputed in the backward instead of keeping its intermediates (under grad)."""
    return checkpoint(fn, *args, use_reentrant=False) if torch.is_grad_enabled() else fn(*args)


def _norm_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    return _recomputed(type(self).__mro__[1].forward, self, hidden_states)


def _mlp_forward(self, x: torch.Tensor) -> torch.Tensor:
    return self.down_proj(_recomputed(_act_times_up, self.act_fn, self.gate_proj(x), self.up_proj(x)))


_LEAN: dict[type, type] = {}


def _lean_class(cls: type, forward) -> type:
    """A subclass of ``cls`` with ``forward``, importable from this module (so models stay picklable)."""
    if cls not in _LEAN:
        name = f"Lean{cls.__name__}"
        lean = type(name, (cls,), {"forward": forward, "__module__": __name__, "__qualname__": name})
        globals()[name] = _LEAN[cls] = lean
    return _LEAN[cls]


def lean_activations_(model: nn.Module) -> int:
    """Swap, in place, every Llama-code RMSNorm and MLP of ``model`` for its lean subclass (see the module
    docstring). Returns the number of modules changed; parameters, state dict and outputs are unchanged."""
    from transformers.models.llama.modeling_llama import LlamaMLP, LlamaRMSNorm

    changed = 0
    for module in model.modules():
        cls = type(module)
        if cls in _LEAN.values():
            continue
        if _same_code(cls.forward, LlamaRMSNorm.forward):
            module.__class__ = _lean_class(cls, _norm_forward)
        elif _same_code(cls.forward, LlamaMLP.forward):
            module.__class__ = _lean_class(cls, _mlp_forward)
        else:
            continue
        changed += 1
    return changed
