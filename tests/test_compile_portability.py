"""``compile_model`` on a tiny Llama causal LM (random weights) in bf16 and in the CPU modes: compiled logits close to
eager ones, transformers' ``generate`` through the compiled decode step, and the same under restricted ISAs.

Regression: inductor's freezing (torch 2.13) baked a transformers ``StaticCache`` (its tensors are marked with
``torch._dynamo.mark_static_address``) into the graph, guarded by shape only. ``generate`` builds a new cache per
call, so the second call ran the graph on the first call's cache: wrong logits, then
``RuntimeError: ... index out of bounds: 0 <= tmpN < <max_cache_len>L`` (``kernels._unmark_static_inputs``).
"""

import json
import os
import subprocess
import sys

import pytest
import torch

import fabric_quant as fq
from fabric_quant.kernels import can_compile, compile_model

pytestmark = pytest.mark.skipif(not can_compile(), reason="no C++ compiler for inductor")

PROMPT, NEW_TOKENS, LAYERS = 6, 4, 2
HEAD = ["lm_head", "model.embed_tokens"]  # tied: both stay float, or the head is quantized untied (include_lm_head)
# mode -> (model dtype, quantize_ options); None = no quantization
MODES = {
    "bf16": (torch.bfloat16, None),
    "woq-int8": (torch.bfloat16, {"include_lm_head": True}),
    "woq-int4": (torch.bfloat16, {"group_size": 128, "include_lm_head": True}),
    "ptq-dynamic-int8": (torch.float32, {"ignore_modules": HEAD}),
}
# compiled vs eager logits (relative to the logits' norm): bf16 rounding differs between fused and unfused code
TOLERANCE = {torch.bfloat16: 3e-2, torch.float32: 1e-3}


def tiny_llama(mode: str, vocab: int = 512):
    """A 2-layer Llama (hidden 128: one int4 group of 128 per row of q/k/v/o) from its config, quantized in ``mode``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    dtype, options = MODES[mode]
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=128, intermediate_size=256, num_hidden_layers=LAYERS, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True,
    )  # fmt: skip
    torch.manual_seed(0)
    model = LlamaForCausalLM._from_config(config, dtype=dtype).eval()
    if options is not None:
        fq.quantize_(model, mode, **options)
    return model


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def generate(model, ids: torch.Tensor):
    """Greedy ``generate`` on a fresh StaticCache (one per call), with the step logits."""
    out = model.generate(ids, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
                         cache_implementation="static", return_dict_in_generate=True, output_logits=True)  # fmt: skip
    return out.sequences, torch.stack(out.logits, 1)


def teacher_forced(model, sequences: torch.Tensor) -> torch.Tensor:
    """Eager logits for the tokens ``generate`` chose (robust to a near-tie argmax flipping between eager/compiled)."""
    return model(sequences[:, :-1]).logits[:, PROMPT - 1 :]


def unique_graphs() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def test_compile_model_serves_a_new_static_address_cache():
    """The root cause without transformers: a cache whose tensors are ``mark_static_address``-ed, new per run."""

    class Cache:
        def __init__(self):
            self.buf, self.pos = torch.zeros(8), torch.zeros(1, dtype=torch.long)
            torch._dynamo.mark_static_address(self.buf)  # guard=False, as transformers' StaticCache does
            torch._dynamo.mark_static_address(self.pos)

    class Step(torch.nn.Module):
        def forward(self, x, cache):
            cache.buf.index_copy_(0, cache.pos, x)
            cache.pos.add_(1)
            return cache.buf.sum()

    torch._dynamo.reset()
    compiled = compile_model(Step())
    graphs = unique_graphs()
    with torch.inference_mode():
        for run in range(3):  # before the fix: run 1 wrote into run 0's cache, run 2 ran past its end
            cache = Cache()
            sums = [float(compiled(torch.full((1,), run + 1.0), cache)) for _ in range(3)]
            assert sums == [run + 1.0, 2 * (run + 1.0), 3 * (run + 1.0)]
            assert cache.buf.tolist() == [run + 1.0] * 3 + [0.0] * 5 and int(cache.pos) == 3
    assert unique_graphs() - graphs == 1  # one graph serves every cache of the same shape


@pytest.mark.slow
@pytest.mark.parametrize("mode", list(MODES))
def test_compiled_causal_lm_matches_eager_through_generate(mode, monkeypatch):
    torch._dynamo.reset()
    model = tiny_llama(mode)
    dtype = MODES[mode][0]
    ids = torch.randint(model.config.vocab_size, (1, PROMPT), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        eager_tokens, eager_logits = generate(model, ids)
        compiled = compile_model(model)
        # transformers' own compiled decoding (auto-compile on GPUs, or compile_config._compile_all_devices): the
        # prefill eager, every decode step through the compiled call
        monkeypatch.setattr(model, "_valid_auto_compile_criteria", lambda *args, **kwargs: True)
        monkeypatch.setattr(model, "get_compiled_call", lambda *args, **kwargs: compiled)
        graphs = unique_graphs()
        for _ in range(2):  # a new StaticCache each call: the second call crashed before the fix
            tokens, logits = generate(model, ids)
            assert tokens.shape == (1, PROMPT + NEW_TOKENS)
            assert rel(logits, teacher_forced(model, tokens)) < TOLERANCE[dtype]
        assert unique_graphs() - graphs == 1  # the decode step compiled once, for both caches
        if torch.equal(tokens, eager_tokens):  # the same greedy path (no near-tie flipped): the same logits
            assert rel(logits, eager_logits) < TOLERANCE[dtype]


@pytest.mark.slow
def test_compiled_bf16_causal_lm_with_the_llama3_vocabulary():
    """The vocabulary of the report (128256, a 32 MB bf16 embedding at hidden 128): a plain compiled forward."""
    torch._dynamo.reset()
    model = tiny_llama("bf16", vocab=128256)
    ids = torch.randint(128256, (1, PROMPT), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        eager = model(ids).logits
        out = compile_model(model)(ids).logits
    assert rel(out, eager) < TOLERANCE[torch.bfloat16]


ISA_SCRIPT = r"""
import json, sys, torch
sys.path.insert(0, sys.argv[1])
from test_compile_portability import MODES, PROMPT, TOLERANCE, generate, rel, teacher_forced, tiny_llama
from fabric_quant.kernels import compile_model
torch.set_num_threads(2)
result = {"capability": torch.backends.cpu.get_cpu_capability()}
for mode in MODES:
    torch._dynamo.reset()
    model = tiny_llama(mode)
    ids = torch.randint(512, (1, PROMPT), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        compiled = compile_model(model)
        model._valid_auto_compile_criteria = lambda *args, **kwargs: True
        model.get_compiled_call = lambda *args, **kwargs: compiled
        errs = []
        for _ in range(2):  # two StaticCaches
            tokens, logits = generate(model, ids)
            errs.append(rel(logits, teacher_forced(model, tokens)))
    result[mode] = {"err": max(errs), "tol": TOLERANCE[MODES[mode][0]]}
print("RESULT " + json.dumps(result))
"""


@pytest.mark.slow
def test_compiled_causal_lm_under_avx2(tmp_path):
    """Every mode compiled and decoded with ATen's kernels and inductor's code limited to AVX2 and oneDNN to AVX2
    (a CPU without AVX-512 / VNNI / AMX), in a subprocess: the ISA is chosen once per process."""
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2",
           "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")}  # fmt: skip  (a cache of its own: other ISAs' code)
    proc = subprocess.run([sys.executable, "-c", ISA_SCRIPT, os.path.dirname(__file__)], env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    result = json.loads(line[len("RESULT ") :])
    assert result.pop("capability") == "AVX2"
    assert set(result) == set(MODES)
    for mode, r in result.items():
        assert r["err"] < r["tol"], (mode, r)
