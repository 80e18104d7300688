"""LoRA dropout inside lora_A (fabric_quant.finetune.lora_dropout): the same gradients as autograd through the same
mask, the same mask when a checkpointed block is recomputed, and less kept for the backward than peft's nn.Dropout.
Also the lean norms and MLP products (fabric_quant.finetune.lean_activations) the recipe applies beside it."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional
from torch.utils.checkpoint import checkpoint

from fabric_quant.finetune.lora_dropout import DropoutLinear, _noise, lean_lora_dropout_


class _Block(nn.Module):
    """q/k-like layers reading one input, then a wider layer: the pattern of a transformer block."""

    def __init__(self, dim: int = 32):
        super().__init__()
        self.q, self.k, self.up = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, 4 * dim)
        self.down = nn.Linear(4 * dim, dim)

    def forward(self, x):
        return x + self.down(functional.silu(self.up(self.q(x) * self.k(x))))


class _Net(nn.Module):
    def __init__(self, checkpointed: bool = False):
        super().__init__()
        self.blocks, self.checkpointed = nn.ModuleList([_Block(), _Block()]), checkpointed

    def forward(self, x):
        for block in self.blocks:
            x = checkpoint(block, x, use_reentrant=False) if self.checkpointed else block(x)
        return x


def _lora(dropout: float, lean: bool, checkpointed: bool = False):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = get_peft_model(_Net(checkpointed), LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout,
                                           target_modules=["q", "k", "up", "down"]))  # fmt: skip
    for name, param in model.named_parameters():
        if "lora_B" in name:  # peft starts B at zero: no gradient would reach A or the input through it
            param.data.normal_(std=0.1)
    if lean:
        assert lean_lora_dropout_(model) == (8 if dropout else 0)
    return model.train()


def test_gradients_are_autograds_through_the_same_mask():
    layer = DropoutLinear(24, 6, bias=False)
    layer.p = 0.25
    x = torch.randn(3, 10, 24, dtype=torch.float64, requires_grad=True)
    layer.double()
    torch.manual_seed(5)
    out = layer(x)
    got = torch.autograd.grad(out, (x, layer.weight), torch.ones_like(out))
    torch.manual_seed(5)  # the seed the layer drew, and the reference through autograd with that mask
    noise = _noise(x, 0.25, int(torch.randint(0, 2**62, ())))
    ref = functional.linear(x * noise, layer.weight)
    want = torch.autograd.grad(ref, (x, layer.weight), torch.ones_like(ref))
    assert torch.allclose(out, ref, rtol=1e-12, atol=0)
    for g, w in zip(got, want, strict=True):
        assert torch.allclose(g, w, rtol=1e-12, atol=1e-14)
    kept = (noise != 0).double().mean().item()
    assert abs(kept - 0.75) < 0.03 and torch.all((noise == 0) | (noise == 1 / 0.75))
    layer.eval()  # no dropout outside training, and no seed drawn
    assert torch.equal(layer(x), functional.linear(x, layer.weight))


def test_a_checkpointed_recompute_draws_the_same_masks():
    """Checkpointing restores the RNG state before recomputing: the gradients equal an uncheckpointed run's."""
    grads = []
    for checkpointed in (False, True):
        model = _lora(0.3, lean=True, checkpointed=checkpointed)
        x = torch.randn(4, 9, 32, requires_grad=True)
        torch.manual_seed(11)
        model(x).square().sum().backward()
        grads.append([x.grad] + [p.grad for p in model.parameters() if p.requires_grad])
    for a, b in zip(*grads, strict=True):
        assert torch.equal(a, b)


def _saved_bytes(model, x) -> int:
    storages = {}

    def keep(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        model(x).sum()
    return sum(storages.values())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_keeps_what_no_dropout_keeps(dtype):
    """peft's nn.Dropout keeps the noise and the dropped input per adapter; the lean one only the inputs, as with
    lora_dropout=0."""
    x = torch.randn(4, 64, 32, dtype=dtype, requires_grad=True)
    stock, lean, none = (_lora(d, lean).to(dtype) for d, lean in ((0.1, False), (0.1, True), (0.0, False)))
    assert _saved_bytes(lean, x) == _saved_bytes(none, x) < _saved_bytes(stock, x)
    assert type(lean.base_model.model.blocks[0].q.lora_dropout["default"]) is nn.Identity
    assert type(stock.base_model.model.blocks[0].q.lora_dropout["default"]) is nn.Dropout


def test_adapter_files_and_merge_are_unchanged(tmp_path):
    """Same parameter names, same saved config (lora_dropout kept), a plain peft reload; eval is the stock model's."""
    from peft import PeftModel

    stock, lean = _lora(0.2, lean=False), _lora(0.2, lean=True)
    assert stock.state_dict().keys() == lean.state_dict().keys()
    lean.save_pretrained(tmp_path)
    torch.manual_seed(0)  # the base weights _lora built
    reloaded = PeftModel.from_pretrained(_Net(), tmp_path)
    assert reloaded.peft_config["default"].lora_dropout == 0.2
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        assert torch.equal(reloaded.eval()(x), lean.eval()(x))
        assert torch.equal(stock.eval()(x), lean(x))  # the same adapter weights: _lora seeds them


def _tiny_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
    return LlamaForCausalLM(config)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lean_norms_and_mlp_give_transformers_results_and_keep_less(dtype):
    """Llama's RMSNorm and MLP product under their own checkpoint: logits and every gradient bit-identical to
    transformers' modules, less kept for the backward; a Gemma-style norm (other arithmetic) is left alone."""
    import pickle

    from transformers.models.gemma.modeling_gemma import GemmaRMSNorm

    from fabric_quant.finetune.lean_activations import lean_activations_

    ids = torch.randint(0, 64, (2, 24), generator=torch.Generator().manual_seed(1))
    results = []
    for lean in (False, True):
        model = _tiny_llama().to(dtype)
        if lean:
            assert lean_activations_(model) == 2 * 2 + 1 + 2  # two norms a block, the final norm, two MLPs
            assert lean_activations_(model) == 0  # done once
            pickle.loads(pickle.dumps(model))  # the lean classes are importable
        logits = model(ids).logits
        kept = _saved_bytes(lambda _, m=model: m(ids).logits, None)
        grads = torch.autograd.grad(logits.float().square().sum(), list(model.parameters()))
        results.append((logits, grads, kept))
    (logits_a, grads_a, kept_a), (logits_b, grads_b, kept_b) = results
    assert torch.equal(logits_a, logits_b)
    for a, b in zip(grads_a, grads_b, strict=True):
        assert torch.equal(a, b)
    assert kept_b < kept_a
    gemma = nn.Sequential(GemmaRMSNorm(32))
    assert lean_activations_(gemma) == 0
