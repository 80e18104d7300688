"""CUDA checks: run with `pytest -m cuda` on a GPU machine (scripts/gpu_check.sh); skipped without a GPU."""

import pytest
import torch
from conftest import BNB_MODES, Net, make_net, rel_err, setup_quantized
from lightning.fabric import Fabric

import fabric_quant as fq
from fabric_quant.nn import QuantizedLinear

pytestmark = pytest.mark.cuda

# error against the float model (measured: nf4 0.124 on an H100, 0.129 on CPU in fp32; fp4 0.165, 0.167; int8 < 0.03)
BOUND = {"int8": 0.04, "int8-training": 0.04, "nf4": 0.14, "nf4-dq": 0.14, "fp4": 0.18, "fp4-dq": 0.18}


def cuda_fabric(mode: str, **kwargs) -> Fabric:
    return Fabric(accelerator="cuda", devices=1, plugins=fq.precision_plugin(mode, **kwargs))


@pytest.mark.parametrize("mode", BNB_MODES)
def test_quantizes_on_the_gpu_forward_backward(mode):
    fabric = cuda_fabric(mode)
    reference = make_net()
    model = fabric.setup_module(make_net())
    _, on_cpu = setup_quantized(mode)  # the same mode on CPU, fp32 compute
    lin = model.module.fc1
    assert isinstance(lin, QuantizedLinear) and lin.is_quantized() and lin.weight.device.type == "cuda"
    x = torch.randn(16, 512, device="cuda", requires_grad=True)
    out = model(x)
    out.float().square().mean().backward()
    assert x.grad is not None and model.module.norm.weight.grad is not None
    with torch.no_grad():
        # the GPU's codes are the CPU's: what is left is bf16 compute (0.004 on CPU) and, for int8, LLM.int8()'s
        # activation rounding on CUDA
        assert rel_err(out.cpu(), on_cpu(x.detach().cpu())) < (0.04 if mode.startswith("int8") else 0.01)
        assert rel_err(out.cpu(), reference(x.detach().cpu())) < BOUND[mode]


@pytest.mark.parametrize("mode", BNB_MODES)
def test_save_reload_bit_exact_on_gpu_and_portable_from_cpu(mode, tmp_path):
    fabric = cuda_fabric(mode)
    model = fabric.setup_module(make_net(seed=0))
    path = fq.save_quantized(model, tmp_path / "gpu.safetensors")
    fresh = fabric.setup_module(make_net(seed=1))
    fq.load_quantized(fresh, path)
    x = torch.randn(4, 512, device="cuda")
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))
    dq = fq.dequantized_state_dict(model)
    plain = Net()
    plain.load_state_dict({k: v.cpu() for k, v in dq.items()})


def test_init_module_does_not_materialize_float_weights_on_gpu():
    fabric = cuda_fabric("nf4-dq", dtype=torch.bfloat16)
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    with fabric.init_module():
        layers = torch.nn.Sequential(*[torch.nn.Linear(4096, 4096, bias=False) for _ in range(8)])
    peak = torch.cuda.max_memory_allocated() - before
    bf16_bytes = 8 * 4096 * 4096 * 2
    assert all(layer.is_quantized() for layer in layers)
    assert peak < 0.45 * bf16_bytes, f"peak {peak / 1e6:.0f} MB vs bf16 model {bf16_bytes / 1e6:.0f} MB"


def test_qlora_recipe_on_gpu(tiny_bert_with_tokenizer, tmp_path):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "recipes"))
    import qlora

    from fabric_quant.finetune.args import EvalArgs, ModelArgs, TrainArgs

    metrics = qlora.setup(
        model=ModelArgs(path=tiny_bert_with_tokenizer), accelerator="cuda", out_dir=tmp_path / "run",
        train=TrainArgs(micro_batch_size=8, global_batch_size=16, max_steps=4, max_seq_length=32, save_interval=2,
                        optimizer="paged_adamw8bit"),
        eval=EvalArgs(interval=None),
    )  # fmt: skip
    assert metrics["steps"] == 4 and metrics["peak_memory_mb"] > 0
    assert (tmp_path / "run" / "final" / "merged" / "config.json").is_file()


@pytest.mark.parametrize("rows", [4, 32])
def test_dynamic_int8_linear_on_the_gpu_any_batch(rows):
    # CUDA's torch._int_mm needs > 16 rows: fewer take the float reference path, with the same numbers
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(64, 32))
    q = fq.quantize_dynamic(net).cuda()
    x = torch.randn(rows, 64)
    with torch.no_grad():
        got = q(x.cuda()).cpu()
        ref = fq.quantize_dynamic(net)(x)
    assert torch.allclose(got, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_fsdp_qlora_on_two_gpus(tmp_path):
    """The sharded recipe over nccl: a tiny Llama, nf4-dq, bf16; the run finishes, each rank holding its half."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    model_dir, data = _tiny_llama_and_data(tmp_path, 32)
    out = tmp_path / "run"
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, str(root / "recipes" / "qlora.py"), "--model.path", str(model_dir),
                           "--model.task", "causal-lm", "--data.train_path", str(data), "--out_dir", str(out),
                           "--accelerator", "cuda", "--devices", "2", "--strategy", "fsdp", "--train.max_steps", "4",
                           "--train.micro_batch_size", "2", "--train.global_batch_size", "4",
                           "--train.max_seq_length", "128", "--eval.interval", "null"],
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    metrics = json.loads((out / "metrics.json").read_text())
    ranks = metrics["per_rank"]
    assert metrics["steps"] == 4 and len(ranks) == 2  # each rank holds its half of the model
    assert abs(ranks[0]["model_mb"] - ranks[1]["model_mb"]) < 0.1 * ranks[0]["model_mb"]


@pytest.mark.parametrize("quantize", ["nf4-dq", "woq-int4", "woq-int8"])
def test_causal_lm_qlora_then_generate_on_gpu(tmp_path, quantize):
    """A tiny Llama fine-tuned QLoRA-style on the GPU, then the generate recipe on the GPU with the adapter (nf4-dq)
    or with the merged model quantized weight-only (the CUDA int4/int8 kernels)."""
    import sys
    from pathlib import Path

    from fabric_quant.finetune.args import DataArgs, EvalArgs, ModelArgs, TrainArgs

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "recipes"))
    import generate
    import qlora

    model_dir, data = _tiny_llama_and_data(tmp_path, 16)
    out = tmp_path / "run"
    metrics = qlora.setup(model=ModelArgs(path=model_dir, task="causal-lm"), accelerator="cuda", out_dir=out,
                          data=DataArgs(train_path=data), eval=EvalArgs(interval=None, initial=False),
                          train=TrainArgs(micro_batch_size=4, global_batch_size=4, max_steps=3,
                                          max_seq_length=128))  # fmt: skip
    assert metrics["steps"] == 3 and metrics["peak_memory_mb"] > 0
    common = {"prompt": "Name the topic.", "max_new_tokens": 6, "accelerator": "cuda", "template": "none"}
    if quantize == "nf4-dq":
        results = generate.setup(model=ModelArgs(path=model_dir, task="causal-lm"), adapter=out / "final" / "adapter",
                                 quantize=quantize, **common)  # fmt: skip
    else:
        results = generate.setup(model=ModelArgs(path=out / "final" / "merged", task="causal-lm"), quantize=quantize,
                                 **common)  # fmt: skip
    assert results[0]["new_tokens"] == 6


def _tiny_llama_and_data(tmp_path, records: int):
    """A tiny Llama folder (the real MiniLM tokenizer) and an instruction JSONL of ``records`` pydoc topics."""
    import json

    from conftest import save_tiny_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from fabric_quant.demo.data import topic_paragraphs

    model_dir = save_tiny_model(tmp_path / "llama", LlamaForCausalLM, LlamaConfig, hidden_size=256,
                                intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                                num_key_value_heads=2, max_position_embeddings=256)  # fmt: skip
    data = tmp_path / "inst.jsonl"
    data.write_text("".join(json.dumps({"instruction": "Topic?", "input": t[:60], "output": topic}) + "\n"
                            for topic, t in topic_paragraphs()[:records]))  # fmt: skip
    return model_dir, data
