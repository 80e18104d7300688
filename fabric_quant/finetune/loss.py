"""Causal-LM loss without the full logits tensor.

A Llama-3-shaped model has a 128256-token vocabulary: for 4 x 256 tokens the logits are 263 MB in bf16, and the
loss as transformers computes it keeps an fp32 copy, its log-softmax and their gradients alive at once (about 1.5 GB,
more than a 1B model's packed 4-bit weights). Here the output head and the cross entropy run over chunks of tokens,
and because the head is frozen in (Q)LoRA, the gradient with respect to the hidden states is computed in the same
pass (softmax minus one-hot, times the head weight; the idea of Liger's fused linear cross entropy): nothing of size
tokens x vocabulary outlives one chunk, and no matmul is recomputed. The loss and gradients equal transformers' up to
summation order (same bf16 matmuls, fp32 log-softmax; tests compare them).
"""

from __future__ import annotations

import functools

import torch
from torch.nn import functional

from fabric_quant.distributed.vocab_parallel import (
    VocabParallelHead,
    chunked_cross_entropy,
    pad_rows,
    softmax_minus_one_hot_,
)
from fabric_quant.nn.base import QuantizedLinear, whole

IGNORE_INDEX = -100
# Architectures whose causal-LM forward is exactly `lm_head(decoder(...).last_hidden_state)` (no logit scaling or
# soft-capping after the head), each checked against transformers' own loss in the tests.
SUPPORTED = ("llama", "mistral", "qwen2", "qwen3")


def _base(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def fused_head_supported(model) -> bool:
    """Whether :class:`ChunkedLossLM` may replace the loss of ``model`` (a PEFT model or a transformers one): a
    supported architecture whose output head is a plain frozen ``nn.Linear`` (a trained or quantized head keeps the
    model's own loss)."""
    model = _base(model)
    head = model.get_output_embeddings()
    return (
        getattr(model.config, "model_type", None) in SUPPORTED
        and isinstance(head, torch.nn.Linear)  # a plain Linear, or FSDP's subclass of one when sharded
        and not isinstance(head, QuantizedLinear)
        and not head.weight.requires_grad
    )


def _chunked(hidden, targets, chunk: int, want_grad: bool, *, weight, bias):
    """Sum of the token losses of ``hidden @ weight.T + bias`` and, if ``want_grad``, its gradient w.r.t. hidden."""
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    grad = torch.empty_like(hidden) if want_grad else None
    for start in range(0, targets.numel(), chunk):
        h, y = hidden[start : start + chunk], targets[start : start + chunk]
        # what transformers' loss sees: bf16 matmul, fp32 softmax
        logits = functional.linear(pad_rows(h), weight, bias).float()
        lse = torch.logsumexp(logits, dim=-1)
        total += (lse[: len(y)] - logits[: len(y)].gather(1, y[:, None]).squeeze(1)).sum()
        if want_grad:
            probs = softmax_minus_one_hot_(logits, lse, torch.arange(len(y), device=y.device), y, len(y))
            grad[start : start + chunk] = (probs.to(weight.dtype) @ weight)[: len(y)]
    return total, grad


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, targets, chunk: int, compute):
        total, grad = compute(hidden, targets, chunk, True)
        ctx.save_for_backward(grad)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        (grad,) = ctx.saved_tensors
        return grad * grad_total.to(grad.dtype), None, None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                         labels: torch.Tensor, chunk: int,
                         head: VocabParallelHead | None = None) -> torch.Tensor:  # fmt: skip
    """Mean next-token cross entropy of ``hidden @ weight.T + bias`` against ``labels`` (shifted by one, ``-100``
    ignored), as transformers' ``ForCausalLMLoss`` computes it, ``chunk`` tokens at a time. ``weight`` is frozen.
    With a vocabulary-parallel ``head`` (``weight`` and ``bias`` unused), each rank's rows of it (collective)."""
    flat = hidden[:, :-1].reshape(-1, hidden.shape[-1])
    targets = labels[:, 1:].reshape(-1).to(hidden.device)
    keep = (targets != IGNORE_INDEX).nonzero().squeeze(1)  # prompt and padding tokens cost no head matmul
    flat, targets = flat.index_select(0, keep), targets.index_select(0, keep)
    if head is not None:
        compute = functools.partial(chunked_cross_entropy, head=head)
    else:
        compute = functools.partial(_chunked, weight=weight, bias=bias)
    if torch.is_grad_enabled() and flat.requires_grad:
        total = _LinearCrossEntropy.apply(flat, targets, chunk, compute)
    else:
        total, _ = compute(flat, targets, chunk, False)
    return total / targets.numel()  # 0/0 = nan with no target, as transformers' mean reduction gives


class LossOutput(dict):
    """The part of a transformers ``CausalLMOutput`` the recipes read: ``.loss``."""

    __getattr__ = dict.__getitem__


class ChunkedLossLM(torch.nn.Module):
    """Wraps a (PEFT) causal LM so that ``forward(input_ids, attention_mask, labels).loss`` is computed by
    :func:`linear_cross_entropy`. The wrapped model keeps its modules (and state dict keys under ``model.``)."""

    def __init__(self, model, chunk: int):
        super().__init__()
        self.model = model
        self.chunk = chunk

    def forward(self, input_ids, attention_mask=None, labels=None) -> LossOutput:
        base = _base(self.model)
        out = base.get_decoder()(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        head = base.get_output_embeddings()
        if isinstance(head, VocabParallelHead):  # each rank's rows of the vocabulary (collective)
            return LossOutput(loss=linear_cross_entropy(out.last_hidden_state, None, None, labels, self.chunk, head))
        # sharded (FSDP): the head's forward, which would gather it, is not called here; gather the frozen weight
        # for the loss only (the backward needs nothing of it)
        weight, bias = (whole(t) if t is not None else None for t in (head.weight, head.bias))
        return LossOutput(loss=linear_cross_entropy(out.last_hidden_state, weight, bias, labels, self.chunk))
