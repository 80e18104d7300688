"""Post-training quantization: observers, fusion numerics, per-channel vs per-tensor, dynamic LSTM/GRU on real
sequences, save/reload, backend selection, the plugin modes, recommend(), and bad input."""

import copy
import os

import pytest
import torch
from lightning.fabric import Fabric
from safetensors.torch import save_file

import fabric_quant as fq
from fabric_quant.kernels import can_compile, compile_model, onednn_int8_available, select_backend
from fabric_quant.nn import DynamicInt8RNN, Int8Conv, Int8Linear
from fabric_quant.nn.int8 import Uint8MaxPool2d
from fabric_quant.numerics.observers import MinMaxObserver, MSEObserver, PercentileObserver


def small_cnn():
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
        torch.nn.Conv2d(8, 16, 3, padding=1), torch.nn.BatchNorm2d(16), torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(16, 16), torch.nn.ReLU(),
        torch.nn.Linear(16, 10),
    )  # fmt: skip


@pytest.fixture(scope="module")
def trained_cnn(digits):
    x, y = digits
    x = x.unsqueeze(1)
    net = small_cnn()
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(120):
        idx = torch.randint(0, 1400, (64,), generator=torch.Generator().manual_seed(_))
        loss = torch.nn.functional.cross_entropy(net(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return net.eval(), x


def accuracy(model, data):
    x, y = data
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


def test_percentile_and_mse_observers_clip_outliers_minmax_keeps():
    torch.manual_seed(0)
    data = [torch.randn(4096) for _ in range(4)] + [torch.tensor([1000.0])]
    observers = [MinMaxObserver(), PercentileObserver(), MSEObserver()]
    for obs in observers:
        for batch in data:
            obs(batch)
    minmax, pct, mse = (obs.qparams()[0].item() for obs in observers)
    assert minmax == pytest.approx((1000 - data_min(data)) / 255, rel=1e-5)
    assert pct < minmax / 50  # the 99.99 % range ignores the single 1000
    assert mse <= minmax  # never wider than min/max


def data_min(data):
    return min(float(t.min()) for t in data)


def test_mse_observer_minimises_quantization_error():
    torch.manual_seed(0)
    x = torch.randn(20000)
    obs, ref = MSEObserver(), MinMaxObserver()
    obs(x), ref(x)

    def err(o):
        scale, zp = o.qparams()
        return (torch.fake_quantize_per_tensor_affine(x, scale, zp, 0, 255) - x).pow(2).mean()

    assert err(obs) <= err(ref)


def test_static_cnn_is_int8_fused_and_accurate(trained_cnn, digits):
    net, x = trained_cnn
    _, y = digits
    q = fq.quantize_static(net, list(x[:512].split(64)), progress=False)
    kinds = [type(m) for m in q]
    assert kinds.count(Int8Conv) == 2 and kinds.count(Int8Linear) == 2
    assert kinds.count(torch.nn.BatchNorm2d) == 0 and kinds.count(torch.nn.ReLU) == 0  # folded / fused
    assert q[8].relu and q[0].relu
    val = (x[1400:], y[1400:])
    assert accuracy(q, val) >= accuracy(net, val) - 0.02
    assert not any(isinstance(m, Int8Conv) for m in net.modules())  # the float model is untouched


def test_linear_relu_fusion_matches_unfused_reference():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    calib = [torch.randn(32, 16) for _ in range(4)]
    fused = fq.quantize_static(net, calib, progress=False)
    unfused = fq.quantize_static(net, calib, fuse=False, progress=False)
    assert isinstance(fused[1], torch.nn.Identity) and isinstance(unfused[1], torch.nn.ReLU)
    x = torch.randn(8, 16)
    with torch.no_grad():
        assert torch.allclose(fused(x), unfused(x), atol=1e-5)


def test_per_channel_beats_per_tensor_on_uneven_rows():
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 8)
    with torch.no_grad():
        lin.weight.mul_(torch.logspace(-2, 1, 8)[:, None])  # rows of very different magnitude
    net = torch.nn.Sequential(lin)
    x = torch.randn(64, 64)
    with torch.no_grad():
        ref = net(x)
        # error on the smallest output row, relative to its size: per-tensor spends the grid on the largest row
        errs = {
            pc: ((fq.quantize_dynamic(net, per_channel=pc)(x) - ref)[:, 0].norm() / ref[:, 0].norm()).item()
            for pc in (True, False)
        }
    per_tensor = fq.quantize_dynamic(net, per_channel=False)
    assert per_tensor[0].weight_scale.numel() == 1 and errs[True] < errs[False] / 5, errs


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_dynamic_rnn_against_float_on_digit_rows(kind, digits):
    x, _ = digits
    seqs = x[:64]  # each image as a sequence of 8 rows of 8 pixels
    torch.manual_seed(0)
    cls = torch.nn.LSTM if kind == "lstm" else torch.nn.GRU
    model = torch.nn.Sequential()
    model.rnn = cls(8, 32, num_layers=2, batch_first=True, bidirectional=True)
    q = fq.quantize_dynamic(model)
    assert isinstance(q.rnn, DynamicInt8RNN) and q.rnn.qweight0.dtype == torch.int8
    with torch.no_grad():
        ref, _ = model.rnn(seqs)
        out, _ = q.rnn(seqs)
    assert torch.nn.functional.cosine_similarity(out.flatten(1), ref.flatten(1)).min() > 0.999
    assert (out - ref).abs().max() < 0.05
    assert 8 < fq.footprint(q).bits_per_quantized_param < 9.5  # int8 + an fp32 scale per gate row


def test_dynamic_rnn_and_linear_save_reload(tmp_path, digits):
    x, _ = digits
    torch.manual_seed(0)

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = torch.nn.LSTM(8, 64, batch_first=True)
            self.head = torch.nn.Linear(64, 10)

        def forward(self, seq):
            return self.head(self.rnn(seq)[0][:, -1])

    net = Net().eval()
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, tmp_path / "fp32.safetensors")
    q = fq.quantize_dynamic(net)
    path = fq.save_quantized(q, tmp_path / "int8.safetensors")
    assert os.path.getsize(tmp_path / "fp32.safetensors") / os.path.getsize(path) > 3.0
    fresh = fq.quantize_dynamic(Net())  # different random weights until the load
    fq.load_quantized(fresh, path)
    with torch.no_grad():
        assert torch.equal(fresh(x[:16]), q(x[:16]))


def test_dynamic_quantizes_embedding_tables_and_reloads(tmp_path, tiny_bert_dir):
    from transformers import AutoConfig, AutoModel

    from fabric_quant.nn import Int8Embedding

    model = AutoModel.from_pretrained(tiny_bert_dir).eval()
    ids = torch.randint(5, 90, (4, 16))
    q = fq.quantize_dynamic(model)
    assert isinstance(q.embeddings.word_embeddings, Int8Embedding)
    assert type(fq.quantize_dynamic(model, layers=["linear"]).embeddings.word_embeddings) is torch.nn.Embedding
    path = fq.save_quantized(q, tmp_path / "int8.safetensors")
    fresh = fq.quantize_dynamic(AutoModel.from_config(AutoConfig.from_pretrained(tiny_bert_dir)).eval())
    fq.load_quantized(fresh, path)
    with torch.no_grad():
        ref, out = model(input_ids=ids).last_hidden_state, q(input_ids=ids).last_hidden_state
        assert torch.equal(fresh(input_ids=ids).last_hidden_state, out)
    assert torch.nn.functional.cosine_similarity(out.flatten(1), ref.flatten(1)).min() > 0.99
    bf16 = fq.quantize_dynamic(model, dtype=torch.bfloat16)
    assert bf16.embeddings.word_embeddings(ids).dtype == torch.bfloat16


def test_static_save_reload_keeps_calibration(tmp_path, trained_cnn):
    net, x = trained_cnn
    q = fq.quantize_static(net, list(x[:256].split(64)), progress=False)
    path = fq.save_quantized(q, tmp_path / "static.safetensors")
    other = fq.quantize_static(small_cnn().eval(), [x[:8] * 3], progress=False)  # same structure, other scales
    fq.load_quantized(other, path)
    with torch.no_grad():
        assert torch.equal(other(x[:32]), q(x[:32]))


def test_backend_selection_and_reference_equivalence(trained_cnn):
    net, x = trained_cnn
    assert select_backend("auto") in ("x86", "reference")
    assert select_backend("reference") == "reference"
    with pytest.raises(ValueError, match=r"Unknown backend 'qnnpack'\. Valid choices: auto, x86, reference"):
        select_backend("qnnpack")
    calib = list(x[:256].split(64))
    ref = fq.quantize_static(net, calib, backend="reference", progress=False)
    convs = [m for m in ref.modules() if isinstance(m, Int8Conv)]
    assert len(convs) == 2 and not any(m.onednn for m in convs)


@pytest.mark.skipif(not onednn_int8_available(), reason="oneDNN int8 convolution needs an x86 CPU")
def test_x86_backend_equals_the_reference_backend(trained_cnn):
    net, x = trained_cnn
    calib = list(x[:256].split(64))
    ref = fq.quantize_static(net, calib, backend="reference", progress=False)
    fast = fq.quantize_static(net, calib, backend="x86", progress=False)
    convs = [m for m in fast.modules() if isinstance(m, Int8Conv)]
    assert len(convs) == 2 and all(m.onednn for m in convs)
    assert fast[0]._emit_to == [fast[3]]  # activations stay uint8 between the two convs
    with torch.no_grad():
        a, b = fast(x[:128]), ref(x[:128])
    assert (a.argmax(1) == b.argmax(1)).float().mean() >= 0.99
    assert torch.isclose(a, b, atol=1e-3, rtol=1e-3).float().mean() >= 0.95


def test_plugin_modes_in_fabric(trained_cnn):
    net, x = trained_cnn
    assert set(fq.available_modes("ptq")) == {"ptq-dynamic-int8", "ptq-dynamic-int8-bf16", "ptq-static-int8"}
    fabric = Fabric(accelerator="cpu", devices=1, plugins=fq.precision_plugin("ptq-static-int8",
                    calibration_data=list(x[:128].split(64))))  # fmt: skip
    model = fabric.setup_module(copy.deepcopy(net))
    assert any(isinstance(m, Int8Conv) for m in model.module.modules())
    dyn = Fabric(accelerator="cpu", devices=1, plugins=fq.precision_plugin("ptq-dynamic-int8"))
    model = dyn.setup_module(torch.nn.Sequential(torch.nn.Linear(8, 8)))
    assert isinstance(model.module[0], Int8Linear)
    with pytest.raises(ValueError, match="needs calibration_data"):
        fq.precision_plugin("ptq-static-int8")
    with pytest.raises(ValueError, match=r"Unknown ptq mode 'ptq-int3'\. Valid choices: ptq-dynamic-int8"):
        fq.PTQPrecision("ptq-int3")


@pytest.mark.skipif(not onednn_int8_available(), reason="oneDNN int8 convolution needs an x86 CPU")
def test_chained_int8_convs_pass_uint8_through_max_pools(digits):
    x = torch.nn.functional.interpolate(digits[0][:256].unsqueeze(1), size=16, mode="bilinear")
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(8, 16, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(16, 10),
    ).eval()  # fmt: skip
    calib = list(x[:128].split(32))
    fast = fq.quantize_static(net, calib, backend="x86", progress=False)
    ref = fq.quantize_static(net, calib, backend="reference", progress=False)
    assert fast[0]._emit_to == [fast[4]] and isinstance(fast[3], Uint8MaxPool2d)
    assert type(fast[6]) is torch.nn.MaxPool2d  # after the last conv: float, left as it is
    with torch.no_grad():
        for batch in (x[128:129], x[128:136], x[128:129], x[128:200]):  # oneDNN weights packed per input shape
            a, b = fast(batch), ref(batch)
            assert torch.isclose(a, b, atol=2e-3, rtol=2e-3).float().mean() >= 0.95
        odd = torch.nn.functional.interpolate(x[:4], size=14, mode="bilinear")  # 7x7 after the first pool
        assert torch.isclose(fast(odd), ref(odd), atol=2e-3, rtol=2e-3).float().mean() >= 0.95


def test_dynamic_bf16_rest_keeps_fp32_scales(tiny_bert_dir, digits):
    from transformers import AutoModel

    model = AutoModel.from_pretrained(tiny_bert_dir).eval()
    ids = torch.randint(5, 90, (4, 16))
    q32 = fq.quantize_dynamic(model)
    q16 = fq.quantize_dynamic(model, dtype="bf16")
    linears = [m for m in q16.modules() if isinstance(m, Int8Linear)]
    assert linears and all(m.weight_scale.dtype == torch.float32 and m.bias.dtype == torch.bfloat16 for m in linears)
    assert all(m.weight.dtype == torch.bfloat16 for m in q16.modules() if isinstance(m, torch.nn.LayerNorm))
    assert torch.equal(linears[0].qweight, next(m for m in q32.modules() if isinstance(m, Int8Linear)).qweight)
    with torch.no_grad():
        a, b = q16(input_ids=ids).last_hidden_state, q32(input_ids=ids).last_hidden_state
    assert a.dtype == torch.bfloat16
    assert torch.nn.functional.cosine_similarity(a.float().flatten(1), b.flatten(1)).min() > 0.995
    rows = digits[0][:32]  # (32, 8, 8): 8 steps of 8 pixels
    torch.manual_seed(0)
    lstm = torch.nn.Sequential(torch.nn.LSTM(8, 16, batch_first=True))
    q = fq.quantize_dynamic(lstm, dtype=torch.bfloat16)
    with torch.no_grad():
        out, ref = q(rows.bfloat16())[0], lstm(rows)[0]
    assert torch.nn.functional.cosine_similarity(out.float().flatten(1), ref.flatten(1)).min() > 0.99
    fabric = Fabric(accelerator="cpu", devices=1, plugins=fq.precision_plugin("ptq-dynamic-int8-bf16"))
    net = fabric.setup_module(torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.LayerNorm(8)))
    assert net(torch.randn(2, 8)).dtype == torch.float32  # bf16 inside, fp32 in and out
    with pytest.raises(ValueError, match=r"dtype=torch\.float16\): valid choices are torch\.float32, torch\.bfloat16"):
        fq.quantize_dynamic(model, dtype="fp16")
    with pytest.raises(ValueError, match=r"Unsupported dtype 'int8'\. Valid choices"):
        fq.quantize_dynamic(model, dtype="int8")


def test_recommend_on_a_tiny_cnn(trained_cnn, digits):
    net, x = trained_cnn
    _, y = digits
    rec = fq.recommend(net, accuracy, (x[1400:], y[1400:]), tolerance=0.02,
                       calibration_data=list(x[:256].split(64)), example_input=x[:1], repeats=3)  # fmt: skip
    assert rec.proposed == "static"
    assert rec.candidates[0].scheme == "fp32" and {c.scheme for c in rec.candidates} == {
        "fp32", "dynamic", "static"}  # fmt: skip
    static = next(c for c in rec.candidates if c.scheme == "static")
    assert static.within_tolerance and static.size_mb < rec.candidates[0].size_mb / 2
    # fp32 first, then the schemes within tolerance by latency; the fastest of those is advised if it beats fp32
    rest = rec.candidates[1:]
    assert rest == sorted(rest, key=lambda c: (not c.within_tolerance, c.latency_ms))
    fastest = next(c for c in rest if c.within_tolerance)
    assert rec.best == (fastest.scheme if fastest.speedup > 1 else "fp32")
    assert f"**{rec.best}**" in rec.markdown() and "| static |" in rec.markdown()


def test_recommend_on_a_tiny_transformer_and_qat_fallback(tiny_bert_dir):
    from transformers import AutoModel

    model = AutoModel.from_pretrained(tiny_bert_dir).eval()
    ids = torch.randint(5, 90, (4, 16))
    with torch.no_grad():
        ref = model(input_ids=ids).last_hidden_state

    def cosine(m, data):
        with torch.no_grad():
            out = m(input_ids=data).last_hidden_state
        return torch.nn.functional.cosine_similarity(out.flatten(1), ref.flatten(1)).mean().item()

    calib = [{"input_ids": ids}]
    rec = fq.recommend(model, cosine, ids, tolerance=0.05, calibration_data=calib, repeats=3)
    assert rec.proposed == "dynamic"
    dynamic = next(c for c in rec.candidates if c.scheme == "dynamic")
    assert dynamic.drop < 0.05
    strict = fq.recommend(model, cosine, ids, tolerance=0.0, calibration_data=calib, repeats=3)
    static = next(c for c in strict.candidates if c.scheme == "static")
    assert static.drop > 0 and not static.within_tolerance  # int8 activations lose something: over a zero tolerance
    assert "QAT" in strict.advice


@pytest.mark.slow
@pytest.mark.skipif(not can_compile(), reason="needs a C++ compiler")
def test_recommend_can_time_the_compiled_candidates(tiny_bert_dir):
    from transformers import AutoModel

    model = AutoModel.from_pretrained(tiny_bert_dir).eval()
    ids = torch.randint(5, 90, (2, 16))

    def norm(m, data):
        with torch.no_grad():
            return m(input_ids=data).last_hidden_state.norm().item()

    eager = fq.recommend(model, norm, ids, tolerance=1e9, example_input={"input_ids": ids}, repeats=2)
    compiled = fq.recommend(model, norm, ids, tolerance=1e9, example_input={"input_ids": ids}, repeats=2, compile=True)
    assert [c.scheme for c in compiled.candidates] == ["fp32", "dynamic"]
    # the metric comes from the eager models either way; only the timing differs
    metrics = {c.scheme: c.metric for c in eager.candidates}
    assert all(c.metric == pytest.approx(metrics[c.scheme]) for c in compiled.candidates)
    assert all(c.latency_ms > 0 for c in compiled.candidates)
    assert not isinstance(compiled.candidates[1].model, torch._dynamo.eval_frame.OptimizedModule)
    with pytest.raises(ValueError, match=r"recommend\(autotune=True\) tunes the compiled candidates"):
        fq.recommend(model, norm, ids, example_input={"input_ids": ids}, autotune=True)


def test_bad_input_is_rejected_clearly(trained_cnn):
    net, x = trained_cnn
    with pytest.raises(ValueError, match="calibration_data is empty"):
        fq.quantize_static(net, [])
    with pytest.raises(ValueError, match="calibration_data is empty"):
        fq.quantize_static(net, iter([]))
    with pytest.raises(ValueError, match=r"observer='histo' is not supported\. Valid choices: \('minmax', 'moving"):
        fq.quantize_static(net, [x[:4]], observer="histo")
    with pytest.raises(ValueError, match="Unknown backend 'fbgemm'"):
        fq.quantize_static(net, [x[:4]], backend="fbgemm")
    with pytest.raises(TypeError, match="found no linear/lstm/gru/embedding layer"):
        fq.quantize_dynamic(torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3)))
    with pytest.raises(ValueError, match=r"layers=\['conv'\]: valid choices are any of \('linear', 'lstm', 'gru', 'e"):
        fq.quantize_dynamic(net, layers=["conv"])
    with pytest.raises(ValueError, match="proj_size"):
        fq.quantize_dynamic(torch.nn.Sequential(torch.nn.LSTM(4, 8, proj_size=2)))
    with pytest.raises(TypeError, match="no Linear, Conv1d/2d, LSTM or GRU"):
        fq.recommend(torch.nn.Sequential(torch.nn.ReLU()), accuracy, None, example_input=x[:1])

    class Branchy(torch.nn.Module):  # calibration never runs the second branch
        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Linear(64, 4), torch.nn.Linear(64, 4)

        def forward(self, x):
            return self.a(x.flatten(1))

    with pytest.raises(ValueError, match=r"calibration never reached \['b'\]"):
        fq.quantize_static(Branchy(), [x[:4]])


@pytest.mark.slow
@pytest.mark.skipif(not (can_compile() and onednn_int8_available()), reason="needs a C++ compiler and oneDNN")
def test_compile_model_lowers_dynamic_int8_linear_to_onednn_int8_gemm():
    from torch._inductor.utils import run_and_get_code

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.GELU(), torch.nn.Linear(256, 256))
    q = fq.quantize_dynamic(net)
    x = torch.randn(32, 256)  # 2 M multiply-adds per layer: above SMALL_MATMUL, the integer path
    with torch.inference_mode():
        out, code = run_and_get_code(lambda: compile_model(q)(x))
        ref = q(x)
    from fabric_quant.nn.cpu_isa import signed_activations

    # the int8 kernel, not a float fallback: with AMX the traced pattern lowered to oneDNN's signed GEMM; elsewhere
    # that GEMM is oneDNN's reference loop, so the graph calls the eager uint8 kernel as one op (nn/cpu_isa.py)
    kernel = "onednn.qlinear_pointwise" if signed_activations() else "fabric_quant.dynamic_int8_linear.default("
    assert "".join(code).count(kernel) >= 2 and "aten._int_mm" not in "".join(code)
    assert torch.allclose(out, ref, atol=1e-5)


@pytest.mark.slow
@pytest.mark.skipif(not (can_compile() and onednn_int8_available()), reason="needs a C++ compiler and oneDNN")
def test_compile_model_autotune_keeps_the_numbers_of_the_eager_int8_model():
    from torch._inductor.utils import run_and_get_code

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.GELU(), torch.nn.Linear(256, 256))
    q = fq.quantize_dynamic(net)
    x = torch.randn(32, 256)
    with torch.inference_mode():
        out, code = run_and_get_code(lambda: compile_model(q, autotune=True)(x))
        ref = q(x)
    # the GEMMs ran as an int8 kernel: inductor's C++ template or oneDNN's, whichever timed faster here (AMX), or
    # the eager uint8 kernel as one op (no AMX: nothing to autotune)
    kernels = ("micro_gemm", "qlinear_pointwise", "aten._int_mm", "fabric_quant.dynamic_int8_linear")
    assert any(k in "".join(code) for k in kernels)
    assert torch.allclose(out, ref, atol=1e-4)
    with pytest.raises(TypeError, match=r"autotune='yes'"):
        compile_model(q, autotune="yes")
