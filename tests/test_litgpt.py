"""litgpt's own scripts on CPU with the package's plugin (fabric_quant.integrations.litgpt), on a tiny litgpt
checkpoint built here (random weights, a byte-level BPE tokenizer trained on a few sentences).

litgpt is optional; its pins are older than this project's, so it is installed with
``pip install --no-deps litgpt==0.5.13`` (the Makefile does; docs/lightning.md)."""

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import ClassVar

import pytest
import torch

litgpt = pytest.importorskip(
    "litgpt", reason="litgpt is not installed: pip install --no-deps litgpt==0.5.13 (docs/lightning.md)"
)

import fabric_quant as fq  # noqa: E402
from fabric_quant.integrations import litgpt as integration  # noqa: E402
from fabric_quant.nn.base import QuantizedLinear, quantized_layers  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
_TEXT = [
    "below is an instruction that describes a task",
    "write a response that appropriately completes the request",
    "the quick brown fox jumps over the lazy dog",
    "### Instruction: ### Input: ### Response:",
]
_WORDS = ["quick", "brown", "lazy", "dog", "over", "task", "jumps", "write"]


def _config(**lora):
    """The tiny model's litgpt config; with LoRA options, litgpt.lora's (whose MLP class is the LoRA one: a base
    checkpoint is written from the plain config)."""
    from litgpt import Config
    from litgpt.lora import Config as LoRAConfig

    # n_embd 64 and the MLP's 256 are whole 4-bit blocks; the lm_head is a quantized Linear too
    cls = LoRAConfig if lora else Config
    return cls(name="tiny", block_size=128, vocab_size=300, padded_vocab_size=320, n_layer=2, n_head=2, n_embd=64,
               rotary_percentage=1.0, **lora)  # fmt: skip


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A litgpt checkpoint folder (lit_model.pth, model_config.yaml, tokenizer files) plus a JSON instruction set
    next to it (data.json)."""
    from litgpt.model import GPT
    from litgpt.utils import save_config
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    root = tmp_path_factory.mktemp("litgpt")
    folder = root / "tiny"
    folder.mkdir()
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # fmt: skip
    tokenizer.train_from_iterator(_TEXT * 10, trainer)
    assert tokenizer.get_vocab_size() == 300
    tokenizer.save(str(folder / "tokenizer.json"))
    special = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
               "add_bos_token": False}  # fmt: skip
    (folder / "tokenizer_config.json").write_text(json.dumps(special))
    config = _config()
    save_config(config, folder)
    torch.manual_seed(0)
    model = GPT(config)
    for param in model.parameters():
        if param.dim() == 2:  # trained-transformer-like Gaussian weights, NF4's premise
            torch.nn.init.normal_(param, std=0.02)
    torch.save(model.state_dict(), folder / "lit_model.pth")  # litgpt's own checkpoint format
    samples = [{"instruction": f"say {word}", "input": "", "output": f"{word} the fox"} for word in _WORDS]
    (root / "data.json").write_text(json.dumps(samples))
    return folder


def _float_weights(folder: Path) -> dict[str, torch.Tensor]:
    from lightning.fabric.utilities.load import _lazy_load

    # litgpt's loader (utils.load_checkpoint) reads its checkpoint so
    return {key: value._load_tensor() for key, value in _lazy_load(folder / "lit_model.pth").items()}


def test_enable_is_idempotent_and_reversible():
    import litgpt.finetune.lora as lora
    import litgpt.generate.base as generate
    from lightning.fabric.plugins import BitsandbytesPrecision

    with integration.enabled():
        integration.enable()  # twice: still one set of saved values
        assert lora.BitsandbytesPrecision is fq.BnbPrecision and generate.BitsandbytesPrecision is fq.BnbPrecision
        assert "bnb.int8" in str(lora.setup.__annotations__["quantize"])
        assert "bnb.int8-training" in str(generate.main.__annotations__["quantize"])
        assert not lora._BITANDBYTES_AVAILABLE_NOT_EQUAL_0_42_0
    assert not integration.is_enabled()
    assert lora.BitsandbytesPrecision is BitsandbytesPrecision
    assert "bnb.int8'" not in str(lora.setup.__annotations__["quantize"])  # litgpt's own: int8-training only


class _Recording(fq.BnbPrecision):
    """The package's plugin, keeping the model it converted so the test can inspect it after litgpt's run."""

    models: ClassVar[list] = []

    def convert_module(self, module):
        _Recording.models.append(module)
        return super().convert_module(module)


def _finetune_args(command: str, checkpoint: Path, out: Path, quantize: str, precision: str) -> list[str]:
    return [
        command, str(checkpoint), "--out_dir", str(out), "--quantize", quantize, "--precision", precision,
        "--data", "JSON", "--data.json_path", str(checkpoint.parent / "data.json"),
        "--data.val_split_fraction", "0.25", "--data.num_workers", "0", "--train.max_steps", "2",
        "--train.global_batch_size", "2", "--train.micro_batch_size", "1", "--train.lr_warmup_steps", "1",
        "--eval.interval", "1", "--eval.max_iters", "1", "--eval.max_new_tokens", "2",
        "--eval.final_validation", "false",
    ]  # fmt: skip


@pytest.mark.parametrize(("mode", "precision"), [("nf4-dq", "32-true"), ("int8", "bf16-true"),
                                                 ("int8-training", "bf16-true")])  # fmt: skip
def test_litgpt_finetune_lora_trains_a_quantized_base_on_cpu(checkpoint, tmp_path, monkeypatch, mode, precision):
    """litgpt's finetune_lora through its own CLI (``python -m fabric_quant.litgpt finetune_lora ...``, here in
    this process: litgpt re-reads sys.argv to save its hyperparameters), with --quantize on CPU: every Linear of
    the base is the package's layer of that mode, the base stays bit-identical to the quantized checkpoint and
    frozen, the LoRA weights change, and litgpt writes the adapter and the merged checkpoint."""
    import litgpt.finetune.lora as lora

    from fabric_quant.litgpt import main

    dtype = {"32-true": torch.float32, "bf16-true": torch.bfloat16}[precision]
    out = tmp_path / "out"
    monkeypatch.setattr(sys, "argv", ["litgpt", *_finetune_args("finetune_lora", checkpoint, out, f"bnb.{mode}",
                                                                precision)])  # fmt: skip
    _Recording.models.clear()
    with integration.enabled():
        lora.BitsandbytesPrecision = _Recording  # restored to Lightning's by leaving enabled()
        main()
    (model,) = _Recording.models
    layers = dict(quantized_layers(model))
    linears = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    assert len(layers) == len(linears) == 2 * 4 + 1  # qkv, attn proj, fc, mlp proj per block, and the head
    assert {layer.fq_mode for layer in layers.values()} == {mode}

    weights = _float_weights(checkpoint)
    for name, layer in layers.items():
        assert not layer.weight.requires_grad
        key = name.replace(".linear", "") + ".weight"  # the LoRA wrapper's inner Linear: litgpt maps the keys
        reference = torch.nn.Linear(layer.in_features, layer.out_features, bias=False)
        reference.weight.data = weights[key].float()
        fresh = fq.quantize_(torch.nn.Sequential(reference), mode, dtype=dtype)[0]
        assert torch.equal(layer.dequantized_weight(), fresh.dequantized_weight()), name
    lora_b = [p for n, p in model.named_parameters() if n.endswith("lora_B")]
    assert lora_b and all(p.requires_grad for p in lora_b)
    assert any(bool(p.detach().abs().sum() > 0) for p in lora_b)  # litgpt initialises lora_B to zeros
    final = out / "final"
    assert (final / "lit_model.pth.lora").is_file() and (final / "lit_model.pth").is_file()


def _same_dequantized_float_model(quantized: torch.nn.Module, config, fabric) -> torch.nn.Module:
    """A float litgpt LoRA model, set up by ``fabric`` (a float precision), holding the quantized model's tensors,
    each quantized Linear's weight replaced by its dequantized weight (in the model's dtype)."""
    from litgpt.lora import GPT, mark_only_lora_as_trainable

    model = fabric.setup_module(GPT(config))
    owners = dict(quantized.named_modules())
    with torch.no_grad():
        for name, param in model.module.named_parameters():
            owner, _, leaf = name.rpartition(".")
            source = owners[owner]
            if isinstance(source, QuantizedLinear) and leaf == "weight":
                param.copy_(source.dequantized_weight())
            else:
                param.copy_(getattr(source, leaf))
        # buffers as they are, dtype included: the rotary tables stay fp32 under both Lightning's bitsandbytes plugin
        # and this package's (litgpt builds them in fp32), where a bf16-true float model casts them to bf16
        for name, _ in list(model.module.named_buffers()):
            owner, _, leaf = name.rpartition(".")
            setattr(model.module.get_submodule(owner), leaf, getattr(owners[owner], leaf).clone())
    mark_only_lora_as_trainable(model.module)
    return model


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_nf4_dq_lora_step_equals_the_float_model_of_the_same_dequantized_weights(checkpoint, dtype):
    """One step of litgpt's finetune_lora (its Fabric set-up and data pipeline, the step of its ``fit``: forward
    with lm_head_chunk_size=128, chunked cross-entropy of the shifted targets, backward) on the nf4-dq base and
    on a float model of the same dequantized weights: the same loss and LoRA gradients, to the bit in fp32 and
    in bf16 (bitsandbytes' CPU 4-bit matmul is a dequantization into the compute dtype followed by torch's
    ``linear``, and its backward the same ``matmul`` torch's ``linear`` backward runs; the dequantized bf16
    weight equals the fp32 one rounded once)."""
    from lightning.fabric import Fabric
    from litgpt.args import TrainArgs
    from litgpt.data import JSON
    from litgpt.finetune.lora import get_dataloaders
    from litgpt.lora import GPT, mark_only_lora_as_trainable
    from litgpt.tokenizer import Tokenizer
    from litgpt.utils import chunked_cross_entropy, load_checkpoint

    config = _config(lora_r=4, lora_alpha=8, lora_dropout=0.0, lora_query=True, lora_value=True,
                     lora_projection=True, lora_mlp=True, lora_head=True)  # fmt: skip
    fabric = Fabric(accelerator="cpu", devices=1, plugins=fq.BnbPrecision("nf4-dq", dtype))
    data = JSON(json_path=checkpoint.parent / "data.json", val_split_fraction=0.25, num_workers=0)
    train_loader, _ = get_dataloaders(fabric, data, Tokenizer(checkpoint), TrainArgs(micro_batch_size=3))
    batch = next(iter(train_loader))
    assert batch["input_ids"].shape[0] == 3  # 3-D activations (batch, sequence, features), padded

    with fabric.init_module(empty_init=False):
        model = GPT(config)
    mark_only_lora_as_trainable(model)
    model = fabric.setup_module(model)
    load_checkpoint(fabric, model, checkpoint / "lit_model.pth", strict=False)
    torch.manual_seed(1)
    with torch.no_grad():  # litgpt starts lora_B at zero, where every lora_A gradient is zero: move off it
        for name, param in model.named_parameters():
            if name.endswith("lora_B"):
                param.normal_(std=0.02)

    def step(net, run_fabric):
        logits = net(batch["input_ids"], lm_head_chunk_size=128)
        logits[-1] = logits[-1][..., :-1, :]
        loss = chunked_cross_entropy(logits, batch["labels"][..., 1:])
        run_fabric.backward(loss)
        return loss.detach(), {n: p.grad for n, p in net.named_parameters() if p.requires_grad}

    loss, grads = step(model, fabric)
    float_fabric = Fabric(accelerator="cpu", devices=1, precision={torch.float32: "32-true",
                                                                    torch.bfloat16: "bf16-true"}[dtype])  # fmt: skip
    reference = _same_dequantized_float_model(model.module, config, float_fabric)
    ref_loss, ref_grads = step(reference, float_fabric)
    grads = {n.removeprefix("_forward_module."): g for n, g in grads.items()}
    ref_grads = {n.removeprefix("_forward_module."): g for n, g in ref_grads.items()}
    assert grads.keys() == ref_grads.keys() and len(grads) == 2 * (2 * 4 + 1)  # A and B of 9 LoRA layers
    assert all(g.dtype is dtype and bool(g.abs().sum() > 0) for g in grads.values())
    assert len(dict(quantized_layers(model))) == 2 * 4 + 1
    assert torch.equal(loss, ref_loss)
    for name in grads:
        assert torch.equal(grads[name], ref_grads[name]), name


@pytest.mark.slow
def test_cli_finetune_lora_with_int8_then_generate(checkpoint, tmp_path):
    """``python -m fabric_quant.litgpt``: litgpt's CLI, with a mode litgpt's finetune_lora does not list
    (bnb.int8), then litgpt's generate on the merged result with nf4."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    out = tmp_path / "out"
    finetune = [sys.executable, "-m", "fabric_quant.litgpt",
                *_finetune_args("finetune_lora", checkpoint, out, "bnb.int8", "bf16-true")]  # fmt: skip
    run = subprocess.run(finetune, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "loss train" in run.stdout and (out / "final" / "lit_model.pth").is_file()
    generate = [sys.executable, "-m", "fabric_quant.litgpt", "generate", str(out / "final"), "--quantize", "bnb.nf4",
                "--precision", "bf16-true", "--max_new_tokens", "4", "--prompt", "say fox"]  # fmt: skip
    run = subprocess.run(generate, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "Time for inference 1" in run.stderr + run.stdout


def test_without_the_integration_litgpt_refuses_bitsandbytes_on_cpu():
    """The behaviour the integration exists for: Lightning's plugin, as litgpt builds it, is refused off CUDA."""
    from lightning.fabric import Fabric
    from lightning.fabric.plugins import BitsandbytesPrecision

    if torch.cuda.is_available():
        pytest.skip("Lightning's plugin is accepted where CUDA is available")
    with pytest.raises(RuntimeError, match="Bitsandbytes is only supported on CUDA GPUs"):
        Fabric(accelerator="cpu", devices=1, plugins=BitsandbytesPrecision("nf4", torch.bfloat16))
