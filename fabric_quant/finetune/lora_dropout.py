"""LoRA dropout that keeps no copy of its output: the mask is drawn again from a seed in the backward pass.

Why: peft computes ``lora_B(lora_A(dropout(x)))``. With ``nn.Dropout`` on CPU, autograd then keeps two tensors the
size of ``x`` for every adapted layer: the scaled noise (for the dropout's gradient) and the dropped input (for
``lora_A``'s weight gradient), held from the forward (or the recomputed forward of a checkpointed block) to the
backward; q, k and v read one input and keep six such tensors. Here ``lora_A`` applies the dropout itself and keeps
only its input ``x`` (shared by the layers that read the same input: q/k/v, gate/up) and an integer seed: the memory
of ``lora_dropout=0``, the same dropout distribution.

The seed comes from the default CPU generator at each forward, so activation checkpointing (which restores the RNG
state before recomputing) recomputes the same mask; the masks differ from ``nn.Dropout``'s for the same seed. Layers
with a LoRA variant (DoRA and others) read the dropout module themselves and are left as peft builds them.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional


def _noise(t: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    """The mask of ``seed`` for a tensor like ``t``, kept entries 1 / (1 - p): ``t * noise`` is ``nn.Dropout``'s."""
    generator = torch.Generator(device=t.device)
    generator.manual_seed(seed)
    return torch.empty_like(t).bernoulli_(1 - p, generator=generator).div_(1 - p)


class _DroppedLinear(torch.autograd.Function):
    """``linear(dropout(x), weight)`` keeping ``x`` and the seed, not the dropped input or the mask."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, p: float, seed: int) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.p, ctx.seed = p, seed
        return functional.linear(x * _noise(x, p, seed), weight)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        noise = _noise(x, ctx.p, ctx.seed)  # the forward's mask: the same seed
        grad_x = grad_weight = None
        if ctx.needs_input_grad[1]:
            dropped = (x * noise).reshape(-1, x.shape[-1])
            grad_weight = grad.reshape(-1, grad.shape[-1]).t() @ dropped
        if ctx.needs_input_grad[0]:
            grad_x = (grad @ weight) * noise
        return grad_x, grad_weight, None, None


class DropoutLinear(nn.Linear):
    """peft's ``lora_A`` (a bias-free ``nn.Linear``, its parameters and state dict unchanged) with the adapter's
    dropout inside (``p``): see the module docstring. Only bias-free layers are given this class."""

    p: float = 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and self.p > 0):
            return functional.linear(x, self.weight)
        seed = int(torch.randint(0, 2**62, ()))
        return _DroppedLinear.apply(x, self.weight, self.p, seed)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, dropout={self.p}"


def lean_lora_dropout_(model: nn.Module) -> int:
    """Move every plain LoRA adapter's ``nn.Dropout`` into its ``lora_A`` (:class:`DropoutLinear`), in place.
    Returns the number of adapters changed. The adapter's saved files and configuration are unchanged."""
    from peft.tuners.lora import LoraLayer

    changed = 0
    for module in model.modules():
        if not isinstance(module, LoraLayer):
            continue
        variants = getattr(module, "lora_variant", {})
        for name, dropout in module.lora_dropout.items():
            lora_a = module.lora_A[name] if name in module.lora_A else None  # noqa: SIM401 (a ModuleDict)
            plain = type(lora_a) is nn.Linear and lora_a.bias is None
            if type(dropout) is not nn.Dropout or not plain or name in variants:
                continue
            lora_a.__class__ = DropoutLinear
            lora_a.p = dropout.p
            module.lora_dropout[name] = nn.Identity()
            changed += 1
    return changed
