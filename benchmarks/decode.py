"""Greedy decoding speed and fidelity of a causal LM in every CPU weight format, eager and compiled.

    python benchmarks/decode.py                                   # Llama-3.2-1B shape, every arm, eager + compiled
    python benchmarks/decode.py --model tiny --new_tokens 8       # seconds: a tiny Llama, for a smoke test
    python benchmarks/decode.py --arms '[bf16, woq-int4-g128]' --batch_sizes '[1]' --compile compiled \\
        --work_dir runs/decode/llama-1b                           # a piece; rows merge into the work dir's results
Writes benchmarks/results/decode_<model>_cpu.{md,csv,png}.

`llama-1b` is a Llama-3.2-1B-shaped model (the shape constants of `qlora_resources.py`: 2048 hidden, 16 layers,
32/8 GQA heads, 8192 MLP, 128256-token vocabulary, tied embeddings) with random weights from its config, saved as
sharded bf16 safetensors and loaded per arm with `fq.from_pretrained` (then `fq.quantize_` for the modes that
quantize a loaded model). Each arm runs in its own process, so its peak memory is its own.

Per batch size: a random prompt of `prompt_tokens` tokens is prefilled (eager, into a transformers `StaticCache`
sized prompt + new tokens), then `new_tokens - 1` decode steps of one token each follow (the first new token comes
from the prefill). The bf16 eager arm decodes greedily and is the reference: every other arm is fed the bf16
tokens (teacher forcing, so every step compares logits for the same prefix) and scored by the cosine of its
logits to bf16's and by how often its own argmax equals bf16's token. `compiled` arms run the decode step
through `fabric_quant.kernels.compile_model` (inductor, freezing, static shapes; gpt-fast's recipe: a static KV
cache so one graph serves every step); its first call (the compilation, with inductor's caches off) is reported
separately. With `--work_dir` the checkpoint, the bf16 reference and the rows persist, so the benchmark can run in
pieces (one arm per command) and each run rewrites the report from every row there.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Literal

import torch
from jsonargparse import CLI

sys.path.insert(0, str(Path(__file__).resolve().parent))
from peers import TORCHAO, torchao_compile, torchao_quantize
from qlora_resources import LLAMA  # the Llama-3.2 shape constants, shared

SHAPES = {"llama-1b": (*LLAMA["llama-1b"], 128256), "tiny": (128, 2, 4, 2, 256, 512)}  # + vocabulary
HEAD = ["lm_head", "model.embed_tokens"]  # tied: quantizing either alone would untie them
TIED = "head = embedding"
# arm -> (from_pretrained mode, load dtype, quantize_ mode, its options, what stays float)
ARMS = {
    "fp32": (None, torch.float32, None, {}, "all (fp32)"),
    "bf16": (None, torch.bfloat16, None, {}, "all (bf16)"),
    "woq-int8": (None, torch.bfloat16, "woq-int8", {}, f"bf16 {TIED}"),
    "woq-int4-g32": (None, torch.bfloat16, "woq-int4", {"group_size": 32}, f"bf16 {TIED}"),
    "woq-int4-g128": (None, torch.bfloat16, "woq-int4", {"group_size": 128}, f"bf16 {TIED}"),
    # the head quantized too (untied from the embedding, which stays bf16 for lookups): every step reads it
    "woq-int8+head": (None, torch.bfloat16, "woq-int8", {"include_lm_head": True}, "bf16 embedding (lookups)"),
    "woq-int4-g128+head": (None, torch.bfloat16, "woq-int4", {"group_size": 128, "include_lm_head": True},
                           "bf16 embedding (lookups)"),
    "ptq-dynamic-int8": (None, torch.float32, "ptq-dynamic-int8", {"ignore_modules": HEAD}, f"fp32 {TIED}"),
    "nf4-dq": ("nf4-dq", torch.bfloat16, None, {}, f"bf16 {TIED}"),
    # torchao 0.18's CPU recipes (reference arms, benchmarks/peers.py), its compiled rows through plain
    # torch.compile as its docs do; the head tied to the embedding stays bf16, as in the arms without +head
    "torchao-int8wo": (None, torch.bfloat16, "torchao-int8wo", {}, f"bf16 {TIED}"),
    "torchao-int4wo-g128": (None, torch.bfloat16, "torchao-int4wo-g128", {}, f"bf16 {TIED}"),
    "torchao-int8dyn": (None, torch.float32, "torchao-int8dyn", {}, f"fp32 {TIED}"),
}
REFERENCE = "bf16"
COLUMNS = ("arm", "compiled", "batch", "float_layers", "weights_mb", "bytes_per_param", "load_s", "prefill_ms",
           "decode_tps_per_seq", "decode_tps_total", "tps_vs_bf16", "tps_vs_fp32", "compile_s", "graphs",
           "logit_cosine", "token_agreement", "peak_rss_mb", "decode_rss_mb", "error")  # fmt: skip


def build_checkpoint(model: str, path: Path) -> Path:
    """The random-weight Llama of shape ``model`` as sharded bf16 safetensors in ``path`` (reused if there)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    if (path / "config.json").is_file():
        return path
    hidden, layers, heads, kv_heads, mlp, vocab = SHAPES[model]
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=mlp, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=2048,
        tie_word_embeddings=True,
    )  # fmt: skip
    torch.manual_seed(0)
    tmp = path.with_name(path.name + ".partial")
    LlamaForCausalLM._from_config(config, dtype=torch.bfloat16).save_pretrained(tmp, max_shard_size="1GB")
    tmp.rename(path)  # complete or absent: a killed run leaves only the .partial folder
    return path


def load_arm(arm: str, path: Path) -> torch.nn.Module:
    import fabric_quant as fq

    load_mode, dtype, mode, options, _ = ARMS[arm]
    model = fq.from_pretrained(path, load_mode, task="causal-lm", dtype=dtype, device="cpu", progress=False)
    if arm in TORCHAO:
        torchao_quantize(model, arm)
    elif mode is not None:
        fq.quantize_(model, mode, **options)
    return model.eval()


def _reset_peak_rss() -> bool:
    """Restart the kernel's peak-RSS counter (VmHWM), so the decode peak is measured without the load's."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _step_files(ref_dir: Path, batch: int, step: int) -> Path:
    return ref_dir / f"b{batch}" / f"step{step}.safetensors"


def decode(model, forward, batch: int, prompt_tokens: int, new_tokens: int, ref_dir: Path, reference: bool) -> dict:
    """Prefill + ``new_tokens - 1`` decode steps on a static cache; greedy and recorded when ``reference``, else
    teacher-forced on the recorded tokens and compared with them. Only the model calls are timed."""
    from safetensors import safe_open
    from safetensors.torch import save
    from transformers import StaticCache

    from fabric_quant.checkpoint import atomic_write_bytes

    gen = torch.Generator().manual_seed(batch)  # the same prompt in every arm
    ids = torch.randint(model.config.vocab_size, (batch, prompt_tokens), generator=gen)
    cache = StaticCache(config=model.config, max_cache_len=prompt_tokens + new_tokens)
    ref_tokens = None
    if not reference:
        with safe_open(str(ref_dir / f"b{batch}" / "tokens.safetensors"), framework="pt") as f:
            ref_tokens = f.get_tensor("tokens")

    def prefill():
        pos = torch.arange(prompt_tokens).unsqueeze(0)
        return model(input_ids=ids, position_ids=pos, cache=cache, use_cache=True, logits_to_keep=1).logits[:, -1]

    def step(token: torch.Tensor, position: int):
        pos = torch.tensor([[position]])
        # a fresh contiguous tensor: dynamo guards on strides and offsets, so a view (of the prompt, of the
        # recorded tokens) would recompile the static-shape graph inside the timed loop
        token = torch.tensor(token.reshape(batch).tolist()).view(batch, 1)
        return forward(input_ids=token, position_ids=pos, cache=cache, use_cache=True).logits[:, -1]

    with torch.inference_mode():
        # warm-up (oneDNN primitives, the compilation): one prefill and three steps, then the same cache again
        prefill()
        start = time.perf_counter()
        step(ids[:, -1], prompt_tokens)
        first_call = time.perf_counter() - start
        for i in range(2):
            step(ids[:, -1], prompt_tokens + 1 + i)
        cache.reset()  # in place: the compiled graph keeps seeing the same (static-address) tensors

        start = time.perf_counter()
        logits = prefill().float()
        prefill_s = time.perf_counter() - start
        decode_s, cosines, agree, tokens, token = 0.0, [], 0, [], None
        for i in range(new_tokens):
            if i:
                start = time.perf_counter()
                logits = step(token, prompt_tokens + i - 1).float()
                decode_s += time.perf_counter() - start
            own = logits.argmax(-1)
            if reference:
                token = own
                tokens.append(own)
                atomic_write_bytes(_step_files(ref_dir, batch, i), save({"logits": logits.contiguous()}))
            else:
                token = ref_tokens[i]
                agree += int((own == token).sum())
                # one mapping per step: a mapping kept open would leave every page read resident (peak RSS)
                with safe_open(str(_step_files(ref_dir, batch, i)), framework="pt") as f:
                    ref = f.get_tensor("logits")
                cosines.append(torch.nn.functional.cosine_similarity(logits, ref, dim=-1))
    if reference:  # written last: its presence says the reference is complete
        atomic_write_bytes(ref_dir / f"b{batch}" / "tokens.safetensors", save({"tokens": torch.stack(tokens)}))
    steps = new_tokens - 1
    return {
        "prefill_ms": prefill_s * 1e3,
        "decode_tps_per_seq": steps / decode_s if steps else float("nan"),
        "decode_tps_total": batch * steps / decode_s if steps else float("nan"),
        "first_step_s": first_call,
        "logit_cosine": 1.0 if reference else float(torch.cat(cosines).mean()),
        "token_agreement": 1.0 if reference else agree / (batch * new_tokens),
        "distinct_tokens": int(torch.stack(tokens).unique().numel()) if reference else None,
    }


def worker(arm: str, compiled: bool, model_dir: Path, batch_sizes: list[int], prompt_tokens: int, new_tokens: int,
           ref_dir: Path, autotune: bool = False) -> list[dict]:  # fmt: skip
    import fabric_quant as fq
    from fabric_quant.kernels import compile_model
    from fabric_quant.report import peak_rss_mb

    start = time.perf_counter()
    model = load_arm(arm, model_dir)
    load_s = time.perf_counter() - start
    fp = fq.footprint(model)
    common = {"arm": arm, "compiled": compiled, "float_layers": ARMS[arm][4], "weights_mb": fp.total_bytes / 1e6,
              "bytes_per_param": fp.total_bytes / fp.numel, "load_s": load_s}  # fmt: skip
    load_peak = peak_rss_mb()
    reset = _reset_peak_rss()
    compiler = torchao_compile if arm in TORCHAO else lambda m: compile_model(m, autotune=autotune)
    forward = compiler(model) if compiled else model
    reference = arm == REFERENCE and not compiled
    rows = []
    for batch in batch_sizes:
        row = {**common, "batch": batch}
        graphs = _graphs_compiled()
        try:
            result = decode(model, forward, batch, prompt_tokens, new_tokens, ref_dir, reference)
            if compiled:  # the first call traces and compiles; a step's own time taken off
                result["compile_s"] = result["first_step_s"] - batch / result["decode_tps_total"]
                # 1 per batch size: a recompile in the warm-up steps would be compilation time compile_s misses
                result["graphs"] = _graphs_compiled() - graphs
            row |= result
        except Exception as err:  # a failing arm (e.g. a compilation error) is a row of the table, not a crash
            row["error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}"
        rows.append(row)
        print(arm, "compiled" if compiled else "eager", row, file=sys.stderr, flush=True)
    decode_peak = peak_rss_mb()  # since the reset (else the whole run's)
    for row in rows:
        row["peak_rss_mb"] = max(load_peak, decode_peak)
        row["decode_rss_mb"] = decode_peak if reset else float("nan")
    return rows


def _graphs_compiled() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def _key(row: dict) -> tuple:
    return row["arm"], bool(row["compiled"]), int(row["batch"])


def _ratios(rows: list[dict]) -> None:
    """tokens/s over bf16's and fp32's of the same batch and the same eager/compiled setting."""
    by_key = {_key(r): r for r in rows}
    for row in rows:
        for base in ("bf16", "fp32"):
            other = by_key.get((base, bool(row["compiled"]), int(row["batch"])), {})
            ok = row.get("decode_tps_total") and other.get("decode_tps_total")
            row[f"tps_vs_{base}"] = row["decode_tps_total"] / other["decode_tps_total"] if ok else float("nan")


def _plot(rows: list[dict], title: str):
    def draw(path: Path) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        from fabric_quant.report import save_figure

        batches = sorted({int(r["batch"]) for r in rows})
        fig, axes = plt.subplots(1, len(batches), figsize=(6 * len(batches), 4.5), squeeze=False)
        for ax, batch in zip(axes[0], batches, strict=True):
            for compiled, marker in ((False, "o"), (True, "s")):
                pts = [r for r in rows if int(r["batch"]) == batch and bool(r["compiled"]) == compiled
                       and r.get("decode_tps_total")]  # fmt: skip
                ax.scatter([r["bytes_per_param"] for r in pts], [r["decode_tps_total"] for r in pts], marker=marker,
                           label="compiled" if compiled else "eager")  # fmt: skip
                for r in pts:
                    ax.annotate(r["arm"], (r["bytes_per_param"], r["decode_tps_total"]), fontsize=7,
                                xytext=(3, 3), textcoords="offset points")  # fmt: skip
            ax.set_xlabel("bytes per parameter (whole model)")
            ax.set_ylabel("decode tokens/s (all sequences)")
            ax.set_title(f"batch {batch}")
            ax.grid(alpha=0.3)
            ax.legend()
        save_figure(fig, path, title)

    return draw


def _summary(rows: list[dict]) -> str:
    """The ratios the issue's targets name, batch 1."""
    by_key = {_key(r): r for r in rows}
    lines = []
    for compiled in (False, True):
        parts = []
        for arm, base in (("woq-int4-g128", "bf16"), ("woq-int4-g128", "fp32"), ("woq-int4-g128+head", "bf16"),
                          ("woq-int4-g128+head", "fp32"), ("woq-int4-g32", "bf16"), ("woq-int8", "bf16"),
                          ("woq-int8+head", "bf16")):  # fmt: skip
            value = by_key.get((arm, compiled, 1), {}).get(f"tps_vs_{base}")
            if value == value and value is not None:
                parts.append(f"{arm} / {base} = {value:.2f}x")
        if parts:
            lines.append(f"- batch 1, {'compiled' if compiled else 'eager'}: " + ", ".join(parts))
    return "\n".join(lines)


def main(
    model: Literal["llama-1b", "tiny"] = "llama-1b",
    arms: list[str] | None = None,
    batch_sizes: list[int] = [1, 8],  # noqa: B006  (jsonargparse reads the default; never mutated)
    compile: Literal["eager", "compiled", "both"] = "both",
    prompt_tokens: int = 128,
    new_tokens: int = 64,
    work_dir: Path | None = None,
    out_dir: Path = Path("benchmarks/results"),
    timeout_s: int = 1800,
    worker_arm: str | None = None,
    worker_compiled: bool = False,
    autotune: bool = False,
) -> list[dict]:
    """Args:
    model: llama-1b (Llama-3.2-1B shape) or tiny (for tests).
    arms: any of the ARMS names (default: all); the bf16 eager reference runs first whenever it is missing.
    batch_sizes: sequences decoded together.
    compile: eager, compiled (the decode step through compile_model) or both.
    prompt_tokens: prompt length (random token ids).
    new_tokens: tokens generated per sequence (the first by the prefill).
    work_dir: keep the checkpoint, the reference and the rows here (runs in pieces merge); default: a temp dir.
    out_dir: where the report goes.
    timeout_s: a worker running longer is stopped and its rows report the timeout.
    autotune: compile with ``compile_model(autotune=True)`` (inductor's C++ GEMM templates benchmarked against the
        library kernels per shape); its rows and report are kept apart (``..._autotune``).
    """
    arms = list(ARMS) if arms is None else arms
    bad = [a for a in arms if a not in ARMS]
    if bad:
        raise ValueError(f"arms={bad}: valid choices are {', '.join(ARMS)}")
    if not batch_sizes or any(b < 1 for b in batch_sizes):
        raise ValueError(f"batch_sizes={batch_sizes}: give one or more sizes >= 1")
    if prompt_tokens < 1 or new_tokens < 2:
        raise ValueError(f"prompt_tokens={prompt_tokens} must be >= 1 and new_tokens={new_tokens} >= 2")
    if worker_arm is not None:
        rows = worker(worker_arm, worker_compiled, work_dir / "model", batch_sizes, prompt_tokens, new_tokens,
                      work_dir / f"ref-{prompt_tokens}x{new_tokens}", autotune)  # fmt: skip
        print("RESULT " + json.dumps(rows), flush=True)
        return rows
    # the command line of these options (also when called as a function, e.g. by the tests)
    command = (
        f"python benchmarks/decode.py --model {model} --arms '{json.dumps(arms)}' --batch_sizes"
        f" '{json.dumps(batch_sizes)}' --compile {compile} --prompt_tokens {prompt_tokens} --new_tokens {new_tokens}"
        + (f" --work_dir {work_dir}" if work_dir is not None else "")
        + (f" --out_dir {out_dir}" if out_dir != Path("benchmarks/results") else "")
        + (" --autotune true" if autotune else "")
    )
    args = (model, arms, batch_sizes, compile, prompt_tokens, new_tokens)
    if work_dir is None:
        with tempfile.TemporaryDirectory() as tmp:
            return _run(*args, Path(tmp), out_dir, timeout_s, command, autotune)
    return _run(*args, Path(work_dir), out_dir, timeout_s, command, autotune)


def _run(model, arms, batch_sizes, compile, prompt_tokens, new_tokens, work_dir, out_dir, timeout_s, command,
         autotune=False):  # fmt: skip
    from fabric_quant.checkpoint import atomic_write_bytes
    from fabric_quant.report import check_plotting, machine_name, write_report

    check_plotting()
    work_dir.mkdir(parents=True, exist_ok=True)
    build_checkpoint(model, work_dir / "model")
    ref_dir = work_dir / f"ref-{prompt_tokens}x{new_tokens}"
    settings = {"eager": [False], "compiled": [True], "both": [False, True]}[compile]
    jobs = [(a, c) for c in settings for a in arms]
    missing = [b for b in batch_sizes if not (ref_dir / f"b{b}" / "tokens.safetensors").is_file()]
    if missing and (REFERENCE, False) not in jobs:
        jobs.insert(0, (REFERENCE, False))  # the others are compared with it
    jobs.sort(key=lambda job: job != (REFERENCE, False))
    tag = "_autotune" if autotune else ""  # autotuned compiled rows are not merged with plain compiled ones
    results_file = work_dir / f"rows-{model}-{prompt_tokens}x{new_tokens}{tag}.json"
    saved = json.loads(results_file.read_text()) if results_file.is_file() else {"rows": [], "commands": []}
    new_rows = []
    for arm, compiled in jobs:
        cmd = [sys.executable, __file__, "--model", model, "--worker_arm", arm, "--worker_compiled",
               str(compiled).lower(), "--batch_sizes", json.dumps(batch_sizes), "--prompt_tokens", str(prompt_tokens),
               "--new_tokens", str(new_tokens), "--work_dir", str(work_dir)]  # fmt: skip
        cmd += ["--autotune", str(autotune).lower()]
        # cold compilation: inductor's on-disk caches would make the reported compile time that of a second run
        env = {**os.environ, "TORCHINDUCTOR_FORCE_DISABLE_CACHES": "1"}
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=env)
            lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
            if out.returncode or not lines:
                raise RuntimeError(f"exit {out.returncode}: {out.stderr.strip().splitlines()[-1:]}")
            rows = json.loads(lines[-1][7:])
        except (subprocess.TimeoutExpired, RuntimeError) as err:
            what = f"timeout after {timeout_s} s" if isinstance(err, subprocess.TimeoutExpired) else str(err)[:300]
            rows = [{"arm": arm, "compiled": compiled, "batch": b, "float_layers": ARMS[arm][4], "error": what}
                    for b in batch_sizes]  # fmt: skip
        for row in rows:
            print({k: row.get(k) for k in ("arm", "compiled", "batch", "decode_tps_total", "logit_cosine", "error")},
                  flush=True)  # fmt: skip
        new_rows += rows
    merged = {_key(r): r for r in saved["rows"]} | {_key(r): r for r in new_rows}
    rows = sorted(merged.values(), key=lambda r: (r["compiled"], r["batch"], list(ARMS).index(r["arm"])))
    _ratios(rows)
    commands = [*[c for c in saved["commands"] if c != command], command]
    atomic_write_bytes(results_file, json.dumps({"rows": rows, "commands": commands}, indent=1).encode())
    distinct = {r["batch"]: r.get("distinct_tokens") for r in rows if _key(r)[:2] == (REFERENCE, False)}
    header = (
        f"# Decode: {model} on {machine_name()}\n\n"
        + ("Command(s): " + "; ".join(f"`{c}`" for c in commands))
        + f". torch {torch.__version__}, {torch.get_num_threads()} threads. Prompt {prompt_tokens} random tokens,"
        f" {new_tokens} new tokens (the first from the prefill, then {new_tokens - 1} timed decode steps),"
        " transformers StaticCache. prefill_ms: one eager prefill (after a warm-up one). decode_tps_per_seq /"
        " _total: decode steps per second per sequence / times the batch. compiled: the decode step through"
        " `fabric_quant.kernels.compile_model` (inductor, freezing, static shapes; the prefill stays eager"
        + ("; autotune=True: inductor's C++ GEMM templates benchmarked against the library kernels per shape"
           if autotune else "")
        + ");"
        " compile_s = its first call (cold: inductor caches off) minus one step; graphs: how many graphs dynamo"
        " compiled for that batch size (1: nothing recompiled in the warm-up steps, outside compile_s)."
        " tps_vs_*: against bf16 / fp32 of the same batch and setting. logit_cosine / token_agreement: every arm fed"
        " the bf16 eager greedy tokens"
        " (teacher forcing), mean cosine of its logits to bf16's and the fraction of steps whose argmax is bf16's"
        f" token. Random weights: bf16's greedy output used {distinct} distinct tokens per batch size; the top-1"
        " margin of a random model's logits is small, so agreement is a harsh test (cosine is the steadier one)."
        " weights_mb / bytes_per_param: `fq.footprint` (the tied embedding counted once). peak_rss_mb: VmHWM of the"
        " arm's process over the load; decode_rss_mb: VmHWM from after the load to the end (decode, compilation).\n\n"
        + _summary(rows)
    )
    name = f"decode_{model}_cpu{tag}"
    paths = write_report(rows, COLUMNS, out_dir, name, header, _plot(rows, f"decode ({model}, CPU)"))
    print(paths["markdown"].read_text())
    return rows


if __name__ == "__main__":
    CLI(main, as_positional=False)
