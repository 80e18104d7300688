"""Weight-only modes (woq-int8, woq-int4): layer numbers, kernels vs reference, checkpoints, footprint, options,
the plugin, and the export of a (fine-tuned) tiny Llama to a folder that reloads and generates alike."""

import shutil
import sys
import warnings
from pathlib import Path

import pytest
import torch
from conftest import make_net, rel_err, save_tiny_model

import fabric_quant as fq
from fabric_quant.finetune.export import export_woq
from fabric_quant.nn.woq import WOQLinear, pack_nibbles, unpack_nibbles
from fabric_quant.woq.folder import load_woq

ROOT = Path(__file__).resolve().parents[1]
LAYER_CASES = [("woq-int8", {}), ("woq-int4", {"group_size": 32}), ("woq-int4", {"group_size": 128}),
               ("woq-int4", {"group_size": 128, "scale_search": "mse"})]  # fmt: skip
# Output error relative to the float layer on Gaussian weights (std 0.02), one step of the grid being uniform
# rounding noise: int8 ~ (absmax / 127) / sqrt(12) / std ~ 0.9 %; int4 groups of 32 ~ 8 %, of 128 ~ 10 %.
BOUND = {("woq-int8", None): 0.015, ("woq-int4", 32): 0.09, ("woq-int4", 128): 0.11}


def _linear(d_in=512, d_out=256, seed=0):
    torch.manual_seed(seed)
    lin = torch.nn.Linear(d_in, d_out)
    torch.nn.init.normal_(lin.weight, std=0.02)
    return lin


def _layer(mode, options, lin):
    bits = 8 if mode == "woq-int8" else 4
    return WOQLinear.from_float(lin, bits, options.get("group_size"), options.get("scale_search", "none"))


@pytest.mark.parametrize(("mode", "options"), LAYER_CASES)
def test_layer_is_close_to_float_and_the_kernel_equals_the_reference(mode, options, monkeypatch):
    monkeypatch.setattr("fabric_quant.nn.woq.FP32_VIA_BF16", False)  # fp32 products: comparable to the reference
    lin = _linear()
    layer = _layer(mode, options, lin)
    x = torch.randn(4, 3, 512)
    with torch.no_grad():
        expected = lin(x)
        out = layer(x)
        assert layer.kernel(x) == ("cpu-int8" if mode == "woq-int8" else "cpu-int4")
        assert out.shape == expected.shape
        assert rel_err(out, expected) < BOUND[(mode, options.get("group_size"))]
        # the kernel computes with exactly the weights of the reference path: fp32 agrees to float rounding
        assert rel_err(out, layer(x, path="reference")) < 1e-5
        xb = x.bfloat16()
        assert rel_err(layer(xb), layer(xb, path="reference")) < 1e-2  # bf16 products, rounded differently
        assert layer(xb).dtype is torch.bfloat16
    assert rel_err(layer.dequantized_weight(), lin.weight) < BOUND[(mode, options.get("group_size"))]
    monkeypatch.setattr("fabric_quant.nn.woq.FP32_VIA_BF16", True)  # the fast path: bf16 inside, fp32 out
    with torch.no_grad():
        fast = layer(x)
    assert fast.dtype is torch.float32 and rel_err(fast, layer(x, path="reference")) < 1e-2


def test_mse_scale_search_lowers_the_reconstruction_error():
    lin = _linear()
    plain = _layer("woq-int4", {"group_size": 128}, lin).dequantized_weight()
    searched = _layer("woq-int4", {"group_size": 128, "scale_search": "mse"}, lin).dequantized_weight()
    assert rel_err(searched, lin.weight) < 0.95 * rel_err(plain, lin.weight)


@pytest.mark.parametrize(("mode", "options"), LAYER_CASES[:3])
def test_many_rows_take_the_dequantize_then_gemm_path_with_the_same_numbers(mode, options, monkeypatch):
    from fabric_quant.nn import woq

    layer = _layer(mode, options, _linear())
    kernel = "cpu-int8" if mode == "woq-int8" else "cpu-int4"
    rows = woq.DEQUANT_ROWS[layer.bits]
    few, many = torch.randn(1, rows - 1, 512), torch.randn(2, rows, 512)
    assert layer.kernel(few) == kernel and layer.kernel(many) == "cpu-dequant"
    with torch.no_grad():
        for dtype in (torch.bfloat16, torch.float32):  # fp32 runs in bf16 inside (FP32_VIA_BF16), as the kernels
            x = many.to(dtype)
            out = layer(x)
            assert out.dtype is dtype and out.shape == (2, rows, 256)
            # the same weights as the kernel and the reference: only the rounding of bf16 products differs
            assert rel_err(out, layer(x, path=kernel)) < 1e-2
            assert rel_err(out, layer(x, path="reference")) < 1e-2
        # in fp32 products the dequantized weight is the reference's up to float rounding
        monkeypatch.setattr(woq, "FP32_VIA_BF16", False)
        assert rel_err(layer(many), layer(many, path="reference")) < 1e-5
        # a layer larger than the workspace runs in blocks of output rows, with the same result
        monkeypatch.setattr(woq, "DEQUANT_CHUNK", 512 * 48)
        monkeypatch.setattr(woq._workspace, "buf", None, raising=False)
        assert rel_err(layer(many), layer(many, path="reference")) < 1e-5  # 256 outputs in 6 blocks of <= 48
    with torch.inference_mode():  # the workspace made here stays writable outside inference mode
        monkeypatch.setattr(woq._workspace, "buf", None)
        layer(many)
    x = many.clone().requires_grad_()
    layer(x).sum().backward()  # autograd keeps its weight: no shared workspace under it
    assert rel_err(x.grad, layer.dequantized_weight().sum(0).expand_as(x)) < 1e-5
    monkeypatch.setattr(woq, "DEQUANT_ROWS", None)  # off: every input size takes the kernel
    assert layer.kernel(many) == kernel


@pytest.mark.parametrize(("d_in", "d_out"), [(200, 48), (96, 64)])
def test_shapes_the_kernels_refuse_run_the_reference_path(d_in, d_out):
    lin = _linear(d_in, d_out)
    layer = WOQLinear.from_float(lin, 4, 64)  # 200 / 96 are not multiples of 64; 48 rows are not of 16 either
    x = torch.randn(5, d_in)
    assert layer.kernel(x) == "reference"
    assert layer.qweight.shape == (d_out, -(-d_in // 64) * 32)  # padded to whole groups in the stored form
    assert rel_err(layer(x).detach(), lin(x).detach()) < 0.11
    assert layer.dequantized_weight().shape == (d_out, d_in)


def test_nibble_packing_round_trips():
    q = torch.randint(0, 16, (6, 10), dtype=torch.uint8)
    assert torch.equal(unpack_nibbles(pack_nibbles(q)), q)
    assert pack_nibbles(torch.tensor([[1, 2]], dtype=torch.uint8)).item() == 0x21  # element 0 in the low nibble


def _state_bytes(model):
    return {k: v.contiguous().view(torch.uint8).reshape(-1).clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("mode", ["woq-int8", "woq-int4"])
def test_save_load_is_bit_exact(mode, tmp_path):
    model = fq.quantize_(make_net(0), mode)
    path = fq.save_quantized(model, tmp_path / "q.safetensors")
    other = fq.quantize_(make_net(1), mode)  # other weights, same layout
    x = torch.randn(3, 512)
    assert not torch.equal(other(x), model(x))
    fq.load_quantized(other, path)
    saved, loaded = _state_bytes(model), _state_bytes(other)
    assert saved.keys() == loaded.keys() and all(torch.equal(saved[k], loaded[k]) for k in saved)
    assert torch.equal(other(x), model(x))  # caches of the old weights were dropped on load


@pytest.mark.parametrize(("mode", "options", "bits"), [("woq-int8", {}, 8 + 16 / 512),
                                                       ("woq-int4", {"group_size": 128}, 4 + 32 / 128),
                                                       ("woq-int4", {"group_size": 32}, 4 + 32 / 32)])  # fmt: skip
def test_footprint_counts_codes_and_constants(mode, options, bits):
    model = fq.quantize_(make_net(), mode, **options)
    fp = fq.footprint(model)
    assert fp.bits_per_quantized_param == pytest.approx(bits)  # bf16 scale (+ bf16 zero) per row / group
    assert fp.quantized_numel == 512 * 512 + 64 * 512
    assert fp.float_bytes == 4 * (512 + 64 + 2 * 512)  # the biases and the LayerNorm stay fp32


@pytest.mark.parametrize(
    ("mode", "options", "error", "match"),
    [
        ("woq-int4", {"group_size": 100}, ValueError, r"group_size=100 .*Valid choices: \(32, 64, 128, 256\)"),
        ("woq-int8", {"group_size": 128}, ValueError, "one scale per output channel"),
        ("woq-int4", {"scale_search": "hqq"}, ValueError, r"scale_search='hqq'.*choices: \('none', 'mse', 'gptq'\)"),
        ("woq-int8", {"scale_search": "mse"}, ValueError, "applies to woq-int4"),
        ("woq-int4", {"groupsize": 32}, TypeError, r"unknown option\(s\) \['groupsize'\]. Valid options: group_size"),
        ("woq-int4", {"include_lm_head": "false"}, TypeError, "include_lm_head='false' must be True or False"),
        ("woq-int4", {"dtype": "int8"}, ValueError, r"Unsupported dtype .*Valid choices"),
        ("woq-int4", {"ignore_modules": ["nope"]}, ValueError, r"ignore_modules=\['nope'\] match no submodule"),
        ("woq-int3", {}, ValueError, r"Unknown quantization mode 'woq-int3'. Valid choices: .*woq-int8, woq-int4"),
    ],
)
def test_bad_options_are_refused_with_the_choices(mode, options, error, match):
    with pytest.raises(error, match=match):
        fq.quantize_(make_net(), mode, **options)
    if mode != "woq-int3" and "ignore_modules" not in options:  # the plugin checks before Lightning sets up
        with pytest.raises(error, match=match if "groupsize" not in options else "argument 'groupsize'"):
            fq.precision_plugin(mode, **options)


@pytest.mark.parametrize("mode", ["woq-int8", "woq-int4"])
def test_quantize_and_the_plugin_give_the_same_bytes(mode):
    from lightning.fabric import Fabric

    direct = fq.quantize_(make_net(), mode, group_size=None if mode == "woq-int8" else 64, dtype="bf16")
    plugin = fq.precision_plugin(mode, group_size=None if mode == "woq-int8" else 64, dtype="bf16")
    assert isinstance(plugin, fq.WOQPrecision)
    fabric = Fabric(accelerator="cpu", devices=1, plugins=plugin)
    wrapped = fabric.setup_module(make_net())
    a, b = _state_bytes(direct), _state_bytes(wrapped.module)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    out = wrapped(torch.randn(2, 512))  # fp32 in, bf16 inside, fp32 out
    assert out.dtype is torch.float32 and wrapped.module.norm.weight.dtype is torch.bfloat16


@pytest.mark.parametrize("mode", ["woq-int8", "woq-int4"])
def test_dequantized_export_loads_into_the_float_model(mode, monkeypatch):
    monkeypatch.setattr("fabric_quant.nn.woq.FP32_VIA_BF16", False)
    model = fq.quantize_(make_net(), mode)
    state = fq.dequantized_state_dict(model)
    net = make_net(1)
    net.load_state_dict(state)  # strict: the packed tensors are not in it
    x = torch.randn(3, 512)
    assert rel_err(net(x).detach(), model(x).detach()) < 1e-5


def test_requantization_is_a_no_op_or_an_error():
    model = fq.quantize_(make_net(), "woq-int4")
    before = _state_bytes(model)
    assert fq.quantize_(model, "woq-int4") is model
    assert all(torch.equal(before[k], v) for k, v in _state_bytes(model).items())
    with pytest.raises(ValueError, match=r"already quantized \(woq-int4\); mode 'woq-int8' cannot"):
        fq.quantize_(model, "woq-int8")


def test_layers_move_between_devices_and_rebuild_the_kernel_layout():
    layer = _layer("woq-int4", {"group_size": 32}, _linear())
    x = torch.randn(2, 512)
    out = layer(x)
    assert layer._cache  # the CPU layout was built
    layer.to("cpu", torch.float32)
    assert not layer._cache and torch.equal(layer(x), out)


# --- the export: a tiny Llama ----------------------------------------------------------------------------------------


def _tiny_llama(path, tie=False):
    from transformers import LlamaConfig, LlamaForCausalLM

    return save_tiny_model(
        path, LlamaForCausalLM, LlamaConfig, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128, tie_word_embeddings=tie,
    )  # fmt: skip


def _greedy(model, n=8):
    ids = torch.tensor([[101, 2054, 2003, 1996, 3007, 1997]])
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                             pad_token_id=0)  # fmt: skip
        logits = model(input_ids=ids).logits
    return out[0, ids.shape[1] :].tolist(), logits


@pytest.mark.parametrize(
    ("mode", "options", "tie"),
    [("woq-int4", {"group_size": 32}, False), ("woq-int8", {}, False),
     ("woq-int4", {"group_size": 64, "include_embeddings": True, "include_lm_head": True}, True),
     ("woq-int8", {"include_embeddings": True}, True)],
)  # fmt: skip
def test_export_of_a_merged_folder_reloads_and_generates_alike(mode, options, tie, tmp_path):
    source = _tiny_llama(tmp_path / "merged", tie)
    out = export_woq(source, tmp_path / "woq", mode, progress=False, **options)
    assert {"model.safetensors", "config.json", "woq.json", "tokenizer.json"} <= {p.name for p in out.iterdir()}
    reloaded = load_woq(out)
    memory = fq.quantize_(fq.from_pretrained(source, None, dtype=torch.bfloat16, progress=False), mode, **options)
    a, b = _state_bytes(memory), _state_bytes(reloaded)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # the streamed export, bit for bit
    tokens, logits = _greedy(reloaded)
    expected_tokens, expected_logits = _greedy(memory)
    assert tokens == expected_tokens and torch.equal(logits, expected_logits)
    head = reloaded.get_output_embeddings()
    assert isinstance(head, WOQLinear) == options.get("include_lm_head", False)


def test_export_refuses_bad_input_before_writing(tmp_path):
    source = _tiny_llama(tmp_path / "m")
    with pytest.raises(ValueError, match="group_size=100"):
        export_woq(source, tmp_path / "out", "woq-int4", group_size=100)
    with pytest.raises(FileNotFoundError, match="not a PEFT adapter folder"):
        export_woq(source, tmp_path / "out", adapter=tmp_path)
    with pytest.raises(FileNotFoundError, match=r"no config\.json"):
        export_woq(tmp_path, tmp_path / "out")
    with pytest.raises(FileNotFoundError, match=r"no woq\.json"):
        load_woq(source)
    (source / "tokenizer_config.json").unlink()
    with pytest.raises(FileNotFoundError, match="no tokenizer files"):
        export_woq(source, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_export_of_base_plus_adapter_equals_exporting_the_merged_model(tmp_path, capsys):
    """The adapter is merged into the dequantized nf4-dq base (merged_tensors), then quantized layer by layer: the
    same bytes as exporting the merged folder the QLoRA recipe writes; generate.py runs the result."""
    from peft import LoraConfig, PeftModel, get_peft_model

    from fabric_quant.finetune.model import save_merged

    base_dir = _tiny_llama(tmp_path / "base")
    base = fq.from_pretrained(base_dir, "nf4-dq", dtype=torch.bfloat16, device="cpu", progress=False)
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    torch.manual_seed(1)
    for name, p in peft_model.named_parameters():
        if "lora_B" in name:  # peft starts B at zero: give the adapter an effect to merge
            torch.nn.init.normal_(p, std=0.05)
    peft_model.save_pretrained(tmp_path / "adapter")
    # the merged folder of the adapter as a user reloads it (fp32 LoRA weights: peft upcasts them on load)
    base = fq.from_pretrained(base_dir, "nf4-dq", dtype=torch.bfloat16, device="cpu", progress=False)
    reloaded = PeftModel.from_pretrained(base, tmp_path / "adapter")
    merged_dir = save_merged(reloaded, tmp_path / "merged", torch.bfloat16)
    for name in ("tokenizer.json", "tokenizer_config.json"):  # as the recipe does after save_merged
        shutil.copy(base_dir / name, merged_dir / name)

    from_adapter = export_woq(base_dir, tmp_path / "a", "woq-int4", adapter=tmp_path / "adapter",
                              base_mode="nf4-dq", group_size=32, progress=False)  # fmt: skip
    from_merged = export_woq(merged_dir, tmp_path / "b", "woq-int4", group_size=32, progress=False)
    a, b = _state_bytes(load_woq(from_adapter)), _state_bytes(load_woq(from_merged))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    plain = _state_bytes(load_woq(export_woq(base_dir, tmp_path / "c", "woq-int4", group_size=32, progress=False)))
    assert not torch.equal(
        plain["model.layers.0.self_attn.q_proj.qweight"], a["model.layers.0.self_attn.q_proj.qweight"]
    )

    tokens, _ = _greedy(load_woq(from_adapter))
    sys.path.insert(0, str(ROOT / "recipes"))
    import generate

    from fabric_quant.finetune.args import ModelArgs

    common = {"prompt": "Name the topic.", "max_new_tokens": 4, "precision": "bf16-true", "accelerator": "cpu",
              "template": "none"}  # fmt: skip
    saved = generate.setup(model=ModelArgs(path=from_adapter, task="causal-lm"), quantize="woq-int4", **common)
    on_load = generate.setup(model=ModelArgs(path=base_dir, task="causal-lm"), quantize="woq-int8", **common)
    assert saved[0]["new_tokens"] == 4 and on_load[0]["new_tokens"] == 4
    with pytest.raises(ValueError, match=r"is a woq-int4 folder .*--quantize must be woq-int4 or null"):
        generate.setup(model=ModelArgs(path=from_adapter, task="causal-lm"), quantize="nf4-dq", **common)
    assert len(tokens) == 8


def test_bench_recipe_and_recommend_have_the_weight_only_rows(tiny_bert_with_tokenizer, tmp_path):
    sys.path.insert(0, str(ROOT / "recipes"))
    import bench
    from transformers import AutoModel

    assert {"woq-int8", "woq-int4"} <= set(bench.all_modes("minilm"))
    rows = bench.setup(task="minilm", model=tiny_bert_with_tokenizer, modes=["woq-int8", "woq-int4"], compile=False,
                       batch_sizes=[1], seq_len=16, num_texts=8, repeats=2, out_dir=tmp_path / "out")  # fmt: skip
    by_mode = {r["mode"]: r for r in rows}
    # one bf16 scale per row of 32 or 64 weights in the tiny layers
    assert 8 + 16 / 64 < by_mode["woq-int8"]["bits_per_quantized_param"] < 8 + 16 / 32
    assert by_mode["woq-int8"]["fidelity"] > 0.99 and by_mode["woq-int4"]["fidelity"] > 0.9

    model = AutoModel.from_pretrained(tiny_bert_with_tokenizer).eval()
    ids = torch.randint(5, 90, (2, 16))

    def norm(m, data):
        with torch.no_grad():
            return m(input_ids=data).last_hidden_state.norm().item()

    rec = fq.recommend(model, norm, ids, tolerance=1e9, example_input={"input_ids": ids}, repeats=2, weight_only=True)
    assert rec.candidates[0].scheme == "fp32"
    assert {c.scheme for c in rec.candidates} == {"fp32", "dynamic", "woq-int8", "woq-int4"}
    woq = next(c for c in rec.candidates if c.scheme == "woq-int4")
    assert any(isinstance(m, WOQLinear) for m in woq.model.modules())


def test_layer_benchmark_script_writes_its_report(tmp_path):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import woq_layers

    rows = woq_layers.setup(in_features=256, out_features=512, batch_sizes=[1], repeats=2, copies=2, out_dir=tmp_path)
    kernels = {r["arm"]: r["kernel"] for r in rows}
    assert kernels["woq-int4 g32 (bf16 act)"] == "cpu-int4" and kernels["woq-int8 (fp32 act)"] == "cpu-onednn"
    assert kernels["woq-int8 dequant (bf16 act)"] == "cpu-dequant"  # both paths timed at every batch size
    errors = {r["arm"]: r["rel_err_vs_fp32"] for r in rows}
    assert errors["woq-int8 dequant (bf16 act)"] == pytest.approx(errors["woq-int8 int8pack (bf16 act)"], rel=0.2)
    assert all(r["median_ms"] > 0 for r in rows)
    for suffix in ("md", "csv", "png"):
        assert (tmp_path / f"woq_layers.{suffix}").stat().st_size > 0


@pytest.mark.cuda
@pytest.mark.parametrize(("mode", "options"), LAYER_CASES[:3])
def test_cuda_kernels_equal_the_reference(mode, options):
    layer = _layer(mode, options, _linear()).to("cuda")
    x = torch.randn(4, 512, device="cuda", dtype=torch.bfloat16)
    assert layer.kernel(x) == ("cuda-int8" if mode == "woq-int8" else "cuda-int4")
    with torch.no_grad():
        assert rel_err(layer(x), layer(x, path="reference")) < 1e-2
        cpu = _layer(mode, options, _linear())
        assert rel_err(layer(x).cpu(), cpu(x.cpu().float())) < 2e-2  # same stored weights on both devices


# --- woq-int8's oneDNN path: the activations split into two int8 terms -----------------------------------------------


def test_split_codes_represent_each_row_to_about_16_bits():
    from fabric_quant.nn.split_int8 import split_codes

    torch.manual_seed(0)
    x = torch.randn(4, 300) * torch.tensor([[1.0], [1e-3], [50.0], [0.0]])
    x[2, 7] = 4000.0  # an outlier sets its row's grid
    q, s = split_codes(x)
    assert q.dtype is torch.int8 and q.shape == (8, 300) and s.shape == (8, 1)
    approx = (q[:4].float() * s[:4] + q[4:].float() * s[4:])
    bound = x.abs().amax(1, keepdim=True) / 64516 * 1.001
    assert bool(((approx - x).abs() <= bound).all())
    assert torch.equal(approx[3], x[3])  # a zero row stays zero
    assert q.abs().max() <= 127


@pytest.fixture
def onednn_everywhere(monkeypatch):
    from fabric_quant.nn import split_int8

    if not split_int8._AVAILABLE:
        pytest.skip("oneDNN's int8 GEMM is not available on this CPU")
    monkeypatch.setattr(split_int8, "MIN_WEIGHTS", 0)  # the tests' layers are small


@pytest.mark.parametrize("bias", [True, False])
def test_onednn_int8_path_is_as_exact_as_fp32_products(onednn_everywhere, bias):
    lin = _linear(512, 256)
    if not bias:
        lin.bias = None
    layer = WOQLinear.from_float(lin, 8, None)
    x = torch.randn(2, 3, 512)
    with torch.no_grad():
        reference = layer(x, path="reference")  # fp32 F.linear on the dequantized weight
        assert layer.kernel(x) == "cpu-onednn" and layer.kernel(torch.randn(200, 512)) == "cpu-onednn"
        out = layer(x)
        assert out.shape == (2, 3, 256) and out.dtype is torch.float32
        assert rel_err(out, reference) < 1e-4  # 16-bit activations, exact int32 sums
        assert rel_err(layer(x, path="cpu-int8"), reference) > 10 * rel_err(out, reference)  # bf16 inside there
        xb = x.bfloat16()
        assert layer(xb).dtype is torch.bfloat16 and rel_err(layer(xb), layer(xb.float(), path="reference")) < 1e-2
        many = torch.randn(130, 512)
        assert rel_err(layer(many), layer(many, path="reference")) < 1e-4
        x_bad = x.clone()
        x_bad[0, 1, 5] = float("nan")
        bad = layer(x_bad)
        assert bad[0, 1].isnan().all() and torch.isfinite(bad[1]).all()  # a NaN row stays NaN, others unharmed


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_onednn_int8_one_row_equals_the_many_row_path_bit_for_bit(onednn_everywhere, dtype):
    # one row (decoding at batch 1) runs the same fp32 operations in numpy (fewer cold calls); the rows of a
    # many-row call go through the same codes, GEMM and rescale, so each row must come out identical
    layer = WOQLinear.from_float(_linear(512, 256), 8, None)
    x = (torch.randn(4, 512) * torch.tensor([[0.01], [1.0], [30.0], [1.0]])).to(dtype)
    x[3, :3] = torch.tensor([2.5, -2.5, 0.5]) * x[3].float().abs().max() / 127  # ties: half to even
    with torch.no_grad():
        assert layer.kernel(x[:1]) == "cpu-onednn"
        many = layer(x)
        for i in range(4):
            assert torch.equal(layer(x[i : i + 1]), many[i : i + 1])
        assert torch.equal(layer(x[1:2].unsqueeze(0)), many[1:2].unsqueeze(0))  # (1, 1, k), as in decoding
        x_bad = x[1:2].clone()
        x_bad[0, 5] = float("nan")
        assert layer(x_bad).isnan().all()  # a NaN row stays NaN
        x_bad[0, 5] = float("inf")
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # numpy's invalid-value warnings would be errors
            assert not layer(x_bad).isfinite().any()


def test_onednn_int8_path_is_not_taken_under_autograd(onednn_everywhere):
    layer = WOQLinear.from_float(_linear(512, 256), 8, None)
    x = torch.randn(40, 512, requires_grad=True)  # many rows: the dequantizing path, which keeps the weight
    assert layer.kernel(x) == "cpu-dequant" and layer.kernel(x.detach()) == "cpu-onednn"
    layer(x).sum().backward()
    assert rel_err(x.grad, layer.dequantized_weight().sum(0).expand_as(x)) < 1e-2  # bf16 products inside


def test_onednn_int8_layers_deepcopy_and_pickle(onednn_everywhere, tmp_path):
    import copy

    layer = WOQLinear.from_float(_linear(512, 256), 8, None)
    x = torch.randn(2, 512)
    with torch.no_grad():
        out = layer(x)  # packs: an opaque oneDNN tensor in the cache
        assert torch.equal(copy.deepcopy(layer)(x), out)
        torch.save(layer, tmp_path / "layer.pt")  # a user's whole-module save: the opaque cache is left out


def test_onednn_int8_layout_follows_a_reload(onednn_everywhere):
    layer, other = WOQLinear.from_float(_linear(512, 256, seed=0), 8, None), _linear(512, 256, seed=1)
    x = torch.randn(2, 512)
    with torch.no_grad():
        layer(x)  # packs the first weights
        layer.load_state_dict(WOQLinear.from_float(other, 8, None).state_dict())
        assert rel_err(layer(x), layer(x, path="reference")) < 1e-4  # the new weights, not the stale packing


def test_small_int8_layers_keep_atens_kernel():
    from fabric_quant.nn import split_int8

    x = torch.randn(1, 4096)
    assert WOQLinear.from_float(torch.nn.Linear(4096, 128), 8, None).kernel(x) == "cpu-int8"  # < 256 outputs
    big = WOQLinear.from_float(torch.nn.Linear(4096, 512), 8, None)
    assert big.kernel(x) == ("cpu-onednn" if split_int8._AVAILABLE else "cpu-int8")
    big.onednn_int8 = False  # the switch: codes held once, ATen's kernel
    assert big.kernel(x) == "cpu-int8"
    assert not split_int8.suits(4096, 128) and not split_int8.suits(512, 256)  # slow / small: measured


def test_compiled_onednn_int8_lowers_to_one_int8_gemm_per_layer(onednn_everywhere):
    from fabric_quant.kernels import can_compile, compile_model
    from fabric_quant.nn.cpu_isa import signed_activations

    if not can_compile():
        pytest.skip("no C++ compiler for inductor")
    torch._dynamo.reset()
    model = torch.nn.Sequential(WOQLinear.from_float(_linear(512, 256), 8, None), torch.nn.ReLU(),
                                WOQLinear.from_float(_linear(256, 512, seed=1), 8, None))  # fmt: skip
    x = torch.randn(1, 512)
    with torch.inference_mode():
        eager = model(x)
        compiled = compile_model(model)
        compiled(x)
        with torch.profiler.profile() as prof:
            out = compiled(x)
    counts = {e.key: e.count for e in prof.key_averages()}
    # with AMX freezing lowers the traced product to oneDNN's signed int8 GEMM; elsewhere that would be oneDNN's
    # reference loop, so the graph calls the eager uint8 kernel as one op (fabric_quant::split_int8_linear)
    assert counts.get("onednn::qlinear_pointwise") == 2, counts
    assert "aten::_int_mm" not in counts and "aten::_weight_int8pack_mm" not in counts
    assert (counts.get("fabric_quant::split_int8_linear") == 2) == (not signed_activations())
    assert rel_err(out, eager) < 1e-5


@pytest.mark.parametrize("mode", ["woq-int4", "woq-int8", "ptq-dynamic-int8"])
def test_compile_model_compiles_once_and_stores_no_layout_while_tracing(mode):
    # the layouts a layer builds on first use are constant-folded under compile_model's freezing; storing them
    # while tracing changed the state the graph was guarded on, and the next call compiled the whole model again
    from fabric_quant.kernels import can_compile, compile_model

    if not can_compile():
        pytest.skip("no C++ compiler for inductor")
    torch._dynamo.reset()
    dtype = torch.float32 if mode == "ptq-dynamic-int8" else torch.bfloat16
    model = torch.nn.Sequential(_linear(256, 512), torch.nn.ReLU(), _linear(512, 256, seed=1)).to(dtype)
    fq.quantize_(model, mode, **({"group_size": 64} if mode == "woq-int4" else {}))
    x = torch.randn(1, 256, dtype=dtype)
    with torch.inference_mode():
        eager = model(x)  # fills the eager caches ...
        for layer in (model[0], model[2]):
            layer._clear_caches()  # ... emptied: the compiled graph must build what it needs itself
        compiled = compile_model(model)
        with torch._dynamo.config.patch(error_on_recompile=True):
            outs = [compiled(x) for _ in range(3)]
    assert not model[0]._cache and not model[2]._cache  # every layer keeps what it derives there
    assert rel_err(outs[-1].float(), eager.float()) < 2e-2
    with torch.inference_mode():
        model(x)  # eager calls still keep what they build, where the layer's kernel keeps it
    path = model[0].kernel(x)
    kept = model[0]._kernel if path.startswith("onednn") else model[0]._cache  # oneDNN's packed int8 weight
    assert kept, f"the eager {path} call kept nothing"


def test_compile_model_compiles_a_bitsandbytes_int8_model_once():
    # bitsandbytes' Linear8bitLt moves its codes into its matmul state on its first forward: compile_model makes
    # that call before tracing, so the traced first call no longer edits guarded state
    import copy

    from fabric_quant.kernels import can_compile, compile_model

    if not can_compile():
        pytest.skip("no C++ compiler for inductor")
    torch._dynamo.reset()
    model = torch.nn.Sequential(_linear(256, 512), torch.nn.ReLU(), _linear(512, 256, seed=1)).to(torch.bfloat16)
    fq.quantize_(model, "int8")
    fresh = copy.deepcopy(model)
    x = torch.randn(4, 256, dtype=torch.bfloat16)
    with torch.inference_mode():
        compiled = compile_model(model)
        with torch._dynamo.config.patch(error_on_recompile=True):
            outs = [compiled(x) for _ in range(3)]
        eager = fresh(x)
    assert rel_err(outs[-1].float(), eager.float()) < 2e-2


# --- GPTQ (scale_search="gptq") ------------------------------------------------------------------------------------


def _correlated(rows, mix):
    return torch.randn(rows, mix.shape[0]) @ mix + 0.1 * torch.randn(rows, mix.shape[0])


def test_gptq_lowers_the_output_error_on_correlated_inputs():
    torch.manual_seed(0)
    mix = torch.randn(512, 512) / 512**0.5  # inputs with structure, as a trained model's
    x = _correlated(4096, mix)
    lin = _linear(512, 256)
    plain = WOQLinear.from_float(lin, 4, 128)
    gptq = WOQLinear.from_float(lin, 4, 128, "gptq", hessian=x.t() @ x / len(x))
    held_out = _correlated(1024, mix)
    with torch.no_grad():
        expected = lin(held_out)
        err_plain, err_gptq = rel_err(plain(held_out), expected), rel_err(gptq(held_out), expected)
        # the library's format: the kernel and the reference agree, codes in range, bf16 constants
        assert rel_err(gptq(held_out, path="reference"), gptq(held_out)) < 1e-2
    assert err_gptq < 0.85 * err_plain  # measured 0.074 against 0.100
    assert gptq.scales.dtype is torch.bfloat16 and unpack_nibbles(gptq.qweight).max() <= 15
    with pytest.raises(ValueError, match="needs the inputs' second moment"):
        WOQLinear.from_float(lin, 4, 128, "gptq")


@pytest.mark.parametrize("budget", [None, 1])  # 1 byte: one calibration pass per layer, in model order
def test_gptq_through_quantize_with_calibration_batches(budget, monkeypatch, tmp_path):
    from fabric_quant.numerics import gptq

    if budget is not None:
        monkeypatch.setattr(gptq, "HESSIAN_BYTES", budget)
    assert len(gptq.hessian_passes({"fc1": 512, "fc2": 512})) == (1 if budget is None else 2)
    torch.manual_seed(0)
    mix = torch.randn(512, 512) / 512**0.5
    batches = [_correlated(128, mix) for _ in range(16)]  # 2048 rows: more than the 512 input features
    model, plain = make_net(), fq.quantize_(make_net(), "woq-int4")
    reference = make_net()
    fq.quantize_(model, "woq-int4", scale_search="gptq", calibration_data=iter(batches))
    assert isinstance(model.fc1, WOQLinear) and isinstance(model.fc2, WOQLinear)
    held_out = _correlated(256, mix)
    with torch.no_grad():
        expected = reference(held_out)
        assert rel_err(model(held_out), expected) < 0.9 * rel_err(plain(held_out), expected)
    fq.save_quantized(model, tmp_path / "m.safetensors")  # the stored form is the plain path's: bit-exact
    other = fq.quantize_(make_net(seed=1), "woq-int4")
    fq.load_quantized(other, tmp_path / "m.safetensors")
    saved, loaded = _state_bytes(model), _state_bytes(other)
    assert saved.keys() == loaded.keys() and all(torch.equal(saved[k], loaded[k]) for k in saved)


@pytest.mark.parametrize(
    ("options", "match"),
    [({"scale_search": "gptq"}, "needs calibration_data"),
     ({"scale_search": "gptq", "calibration_data": []}, "calibration_data is empty"),
     ({"calibration_data": [torch.randn(2, 512)]}, r"only used by scale_search='gptq' \(got 'none'\)"),
     ({"scale_search": "gptq", "calibration_data": [torch.randn(2, 7)]}, "")],
)  # fmt: skip
def test_gptq_refuses_bad_calibration_and_leaves_the_model(options, match):
    model = make_net()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises((ValueError, RuntimeError), match=match):
        fq.quantize_(model, "woq-int4", **options)
    assert type(model.fc1) is torch.nn.Linear and type(model.fc2) is torch.nn.Linear
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_gptq_needs_every_layer_reached_and_is_refused_where_nothing_runs(tmp_path):
    class Branchy(torch.nn.Module):  # `unused` never sees an input
        def __init__(self):
            super().__init__()
            self.used, self.unused = torch.nn.Linear(64, 64), torch.nn.Linear(64, 64)

        def forward(self, x):
            return self.used(x)

    with pytest.warns(UserWarning, match="rank-deficient"):  # 4 rows for 64 input features
        fq.quantize_(torch.nn.Sequential(torch.nn.Linear(64, 64)), "woq-int4", group_size=32, scale_search="gptq",
                     calibration_data=[torch.randn(4, 64)])  # fmt: skip
    with pytest.raises(ValueError, match=r"never reached \['unused'\]"):
        fq.quantize_(Branchy(), "woq-int4", group_size=32, scale_search="gptq", calibration_data=[torch.randn(4, 64)])
    with pytest.raises(ValueError, match="WOQPrecision: scale_search='gptq' runs calibration"):
        fq.precision_plugin("woq-int4", scale_search="gptq")
    with pytest.raises(ValueError, match="export_woq: scale_search='gptq'"):
        export_woq(tmp_path / "missing", tmp_path / "out", mode="woq-int4", scale_search="gptq")
    assert not (tmp_path / "out").exists()
