"""LLM-scale loading: quantize while streaming a checkpoint, and the layer fixes it needs (meta init, lazy loads)."""

import json

import pytest
import torch
from conftest import BNB_MODES, make_net, setup_quantized

import fabric_quant as fq
from fabric_quant.bnb import BnbConfig
from fabric_quant.loading import from_pretrained
from fabric_quant.nn import QuantizedLinear


def _bytes(t: torch.Tensor) -> bytes:
    return t.detach().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes()


@pytest.mark.parametrize("mode", BNB_MODES)
def test_to_empty_and_reset_parameters_keep_a_quantized_weight(mode):
    cls = BnbConfig.create(mode, torch.float32).layer_class()
    layer = cls(64, 32, device="meta")
    layer.to_empty(device="cpu")
    layer.reset_parameters()
    x = torch.randn(4, 64)
    assert layer.is_quantized()
    stored = {"int8-training": torch.float32, "int8": torch.int8}.get(mode, torch.uint8)
    assert layer.weight.dtype == stored
    with torch.no_grad():
        out = layer(x)
        expected = torch.nn.functional.linear(x, layer.dequantized_weight(), layer.bias)
    assert torch.allclose(out, expected, atol=0.05, rtol=0.05)
    bound = 1 / 64**0.5  # nn.Linear's kaiming-uniform bound
    assert 0.5 * bound < layer.dequantized_weight().abs().max() <= bound * 1.01
    before = layer.dequantized_weight().clone()
    layer.reset_parameters()  # on an already quantized layer: a fresh draw, still quantized
    assert layer.is_quantized() and not torch.equal(layer.dequantized_weight(), before)


@pytest.mark.parametrize("mode", ["nf4-dq", "int8"])
def test_state_dicts_from_lightnings_lazy_loader_load(mode, tmp_path):
    from lightning.fabric.utilities.load import _lazy_load

    float_sd = make_net(3).state_dict()
    torch.save(float_sd, tmp_path / "float.pt")
    _, eager = setup_quantized(mode)
    _, lazy = setup_quantized(mode)
    eager.load_state_dict(float_sd)
    lazy.load_state_dict(_lazy_load(tmp_path / "float.pt"))  # quantize-on-load from lazy tensors
    assert {k: _bytes(v) for k, v in lazy.state_dict().items()} == {k: _bytes(v) for k, v in eager.state_dict().items()}
    torch.save(eager.state_dict(), tmp_path / "quantized.pt")  # a quantized checkpoint, lazily loaded
    _, again = setup_quantized(mode, make_net(9))
    again.load_state_dict(_lazy_load(tmp_path / "quantized.pt"))
    x = torch.randn(2, 512)
    with torch.no_grad():
        assert torch.equal(again(x), eager(x))


def test_meta_model_with_assign_load_keeps_the_compute_dtype():
    with torch.device("meta"):
        net = make_net()
    fq.quantize_(net, "nf4", dtype=torch.bfloat16)
    net.load_state_dict(make_net().state_dict(), assign=True)
    assert net.fc1.is_quantized() and net.fc1.weight.dtype == torch.uint8
    assert net.norm.weight.dtype == torch.bfloat16 and net.fc1.bias.dtype == torch.bfloat16


def _tiny_llama(path, tie=True, shard="60KB"):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         tie_word_embeddings=tie)  # fmt: skip
    torch.manual_seed(0)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(path, max_shard_size=shard)
    return path


@pytest.mark.parametrize("mode", [None, "nf4-dq", "fp4", "int8"])
@pytest.mark.parametrize("tie", [True, False])
def test_from_pretrained_equals_quantizing_the_loaded_model(mode, tie, tmp_path):
    from transformers import AutoModelForCausalLM

    path = _tiny_llama(tmp_path / "llama", tie=tie)
    assert (path / "model.safetensors.index.json").is_file()  # sharded, as real checkpoints are
    streamed = from_pretrained(path, mode, dtype=torch.bfloat16, device="cpu", progress=False)
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    if mode is not None:
        fq.quantize_(ref, mode, dtype=torch.bfloat16, ignore_modules={"lm_head"})
        assert isinstance(streamed.model.layers[0].mlp.up_proj, QuantizedLinear)
        assert type(streamed.lm_head) is torch.nn.Linear  # the output head stays float by default
    a, b = streamed.state_dict(), ref.state_dict()
    assert a.keys() == b.keys() and all(_bytes(a[k]) == _bytes(b[k]) for k in a)
    assert (streamed.lm_head.weight is streamed.model.embed_tokens.weight) == tie
    assert streamed.model.rotary_emb.inv_freq.dtype == torch.float32  # computed tables keep their precision
    ids = torch.randint(0, 300, (2, 12))
    with torch.no_grad():
        assert torch.equal(streamed(ids).logits, ref(ids).logits)


@pytest.mark.parametrize("mode", ["nf4-dq", "int8"])
def test_from_pretrained_equals_quantize_with_its_defaults_on_a_tied_model(mode, tmp_path):
    """The loader's promise with nothing but the mode given: a tied output head stays float and tied on both paths
    (quantize_ used to quantize it on its own, untying it from the embedding: other codes and other logits)."""
    from transformers import AutoModelForCausalLM

    path = _tiny_llama(tmp_path / "llama", tie=True, shard="70KB")
    assert len(set(json.loads((path / "model.safetensors.index.json").read_text())["weight_map"].values())) == 3
    streamed = from_pretrained(path, mode, device="cpu", progress=False)  # bf16 by default
    ref = fq.quantize_(AutoModelForCausalLM.from_pretrained(path), mode, dtype=torch.bfloat16).eval()
    for model in (streamed, ref):
        assert type(model.lm_head) is torch.nn.Linear and model.lm_head.weight is model.model.embed_tokens.weight
    a, b = streamed.state_dict(), ref.state_dict()
    assert a.keys() == b.keys() and all(_bytes(a[k]) == _bytes(b[k]) for k in a)
    ids = torch.randint(0, 300, (2, 12))
    with torch.no_grad():
        assert torch.equal(streamed(ids).logits, ref(ids).logits)
    # the Lightning plugin converts the same way
    from lightning.fabric import Fabric

    fabric = Fabric(accelerator="cpu", devices=1, plugins=fq.precision_plugin(mode, dtype=torch.bfloat16))
    wrapped = fabric.setup_module(AutoModelForCausalLM.from_pretrained(path)).module.eval()
    assert wrapped.lm_head.weight is wrapped.model.embed_tokens.weight
    assert all(_bytes(v) == _bytes(b[k]) for k, v in wrapped.state_dict().items())


def test_from_pretrained_classification_head_is_new_and_named(tiny_bert_with_tokenizer):
    with pytest.warns(UserWarning, match=r"newly initialised \(not in the checkpoint\): \['classifier.weight'"):
        model = from_pretrained(tiny_bert_with_tokenizer, "nf4-dq", task="sequence-classification",
                                dtype=torch.float32, num_labels=3, progress=False)  # fmt: skip
    assert model.classifier.out_features == 3 and type(model.classifier) is torch.nn.Linear
    assert isinstance(model.bert.encoder.layer[0].attention.self.query, QuantizedLinear)
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=torch.randint(0, 100, (1, 8))).logits).all()


def test_from_pretrained_bad_input(tmp_path):
    with pytest.raises(FileNotFoundError, match="is not a Hugging Face model folder"):
        from_pretrained(tmp_path)
    path = _tiny_llama(tmp_path / "llama")
    with pytest.raises(ValueError, match=r"task='vision' is not supported. Valid choices: causal-lm"):
        from_pretrained(path, task="vision")
    with pytest.raises(ValueError, match=r"Unknown bitsandbytes mode 'nf5'"):
        from_pretrained(path, "nf5")
    with pytest.raises(ValueError, match="shares the input embedding's weight"):
        from_pretrained(path, "nf4", ignore_modules=(), progress=False)


@pytest.mark.parametrize("mode", ["nf4", "nf4-dq", "int8"])
def test_from_pretrained_refuses_non_finite_weights(mode, tmp_path):
    from safetensors.torch import load_file, save_file

    path = _tiny_llama(tmp_path / "llama", shard="10MB")
    tensors = load_file(path / "model.safetensors")
    key = "model.layers.1.mlp.down_proj.weight"
    tensors[key][3, 5] = float("inf")
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=rf"{key} holds non-finite values \(NaN/inf\): refusing to quantize it"):
        from_pretrained(path, mode, progress=False)
