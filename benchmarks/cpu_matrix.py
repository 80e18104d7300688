"""Every CPU mode against eager fp32 and bf16 on this CPU, at batch 1 and 8, eager and compiled, under the CPU's
own ISA and under restricted ones (oneDNN / ATen caps emulate smaller CPUs), with the kernel each layer ran.

    python benchmarks/cpu_matrix.py                                  # MiniLM + MLP, native ISA, eager + compiled
    python benchmarks/cpu_matrix.py --isas '[native, avx512-vnni, avx2]' --compile eager
    python benchmarks/cpu_matrix.py --part decode                    # the 1B Llama decode (benchmarks/decode.py)
Writes benchmarks/results/cpu_matrix_<part>_<cpu>.{md,csv,png}.

Parts:
- ``layers``: all-MiniLM-L6-v2 (real weights, seq 128: batch 1 and 8 sequences) and an MLP 1024-4096-4096-1024
  (1 and 8 rows), arms: fp32, bf16, torch.ao's fbgemm ``quantize_dynamic`` (comparison only), torchao's int8
  weight-only / int8 dynamic / int4 (tinygemm) arms, and the package's ``ptq-dynamic-int8`` (``-bf16``),
  ``woq-int8``, ``woq-int4``, ``nf4-dq`` and ``int8`` (bitsandbytes). Compiled rows: the package's arms and fp32 /
  bf16 through ``fabric_quant.kernels.compile_model``, torchao's through plain ``torch.compile``. Every arm of one
  model and batch is timed in turns (``fabric_quant.report.measure_latencies``), so ratios are from one run;
  ``*_vs_fp32`` is against *eager* fp32. MiniLM fidelity: mean-pooled embedding cosine vs fp32.
- ``decode``: ``benchmarks/decode.py`` on the Llama-3.2-1B shape with the arms named by ``--decode_arms``.
Each ISA runs in its own process (the caps are read when torch loads).
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Literal

import torch
from jsonargparse import CLI

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "recipes"))
from peers import torchao_available, torchao_compile, torchao_quantize

ISAS = {
    "native": {},
    "avx512-vnni": {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_VNNI"},  # an Intel / AMD CPU without AMX
    "avx2": {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"},  # no VNNI, no AVX-512 (e.g. AMD Zen 2/3)
}
FQ_ARMS = ("ptq-dynamic-int8", "ptq-dynamic-int8-bf16", "woq-int8", "woq-int4", "nf4-dq", "int8")
COMPILED = ("fp32", "bf16", "ptq-dynamic-int8", "ptq-dynamic-int8-bf16", "woq-int8", "woq-int4", "torchao-int8wo",
            "torchao-int8dyn", "torchao-int4wo-g128")  # fmt: skip
COLUMNS = ["isa", "model", "arm", "compiled", "kernels", "b1_ms", "b1_vs_fp32", "b1_vs_bf16", "b8_ms", "b8_vs_fp32",
           "b8_vs_bf16", "cosine_vs_fp32"]  # fmt: skip
BATCHES = (1, 8)


def _torch_ao(model: torch.nn.Module) -> torch.nn.Module:
    with warnings.catch_warnings():  # deprecated: a comparison arm only
        warnings.simplefilter("ignore")
        from torch.ao.quantization import quantize_dynamic

        return quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)


def build_arms(build, peers: bool) -> dict[str, torch.nn.Module]:
    """Every arm of one model, from ``build()`` (a fresh fp32 model)."""
    import fabric_quant as fq

    arms = {"fp32": build(), "bf16": build().to(torch.bfloat16), "torch.ao fbgemm dynamic int8": _torch_ao(build())}
    if peers:
        arms["torchao-int8wo"] = torchao_quantize(build(), "torchao-int8wo")
        arms["torchao-int8dyn"] = torchao_quantize(build(), "torchao-int8dyn")
        arms["torchao-int4wo-g128"] = torchao_quantize(build().to(torch.bfloat16), "torchao-int4wo-g128")
    for mode in FQ_ARMS:
        arms[mode] = fq.quantize_(build(), mode)
    return {name: model.eval() for name, model in arms.items()}


def _kernels(model: torch.nn.Module) -> str:
    from fabric_quant.kernel_report import report

    found = report(model, rows=BATCHES, dtype=torch.float32).layers
    return " / ".join(sorted({"+".join(sorted(set(ks))) for _, _, ks in found})) or "-"


def _compiled(name: str, model: torch.nn.Module):
    from fabric_quant.kernels import compile_model

    return torchao_compile(model) if name.startswith("torchao") else compile_model(model)


def time_model(label: str, arms: dict, inputs: dict, repeats: int, compile: bool, rows: list[dict], isa: str,
               cosines: dict | None = None) -> None:  # fmt: skip
    from tqdm import tqdm

    from fabric_quant.report import measure_latencies

    settings = [False, True] if compile else [False]
    table = {(a, c): {"isa": isa, "model": label, "arm": a, "compiled": c, "kernels": _kernels(m) if not c else "",
                      "cosine_vs_fp32": (cosines or {}).get(a, float("nan"))}
             for c in settings for a, m in arms.items() if not c or a in COMPILED}  # fmt: skip
    for batch, x in inputs.items():
        fns = {}
        for (arm, compiled) in tqdm(table, desc=f"{label} b{batch}", leave=False):
            model = arms[arm]
            fn = _compiled(arm, model) if compiled else model
            call = _caller(fn, x, torch.bfloat16 if arm in ("bf16", "torchao-int4wo-g128") else None)
            with torch.inference_mode():
                call()  # a compiled arm compiles here, outside the timed turns
            fns[(arm, compiled)] = call
        times = measure_latencies(fns, repeats, warmup=2)
        fp32, bf16 = times[("fp32", False)]["median_ms"], times[("bf16", False)]["median_ms"]
        for key, t in times.items():
            table[key] |= {f"b{batch}_ms": t["median_ms"], f"b{batch}_vs_fp32": fp32 / t["median_ms"],
                           f"b{batch}_vs_bf16": bf16 / t["median_ms"]}  # fmt: skip
        torch._dynamo.reset()  # the next batch size compiles afresh; old graphs freed
    rows += list(table.values())


def _caller(fn, x, cast):
    if isinstance(x, dict):  # token ids and mask: the same for every dtype
        return lambda: fn(**x)
    x = x if cast is None else x.to(cast)
    return lambda: fn(x)


def layers_worker(isa: str, repeats: int, compile: bool, num_texts: int) -> list[dict]:
    from bench import MiniLMTask

    rows: list[dict] = []
    peers = torchao_available()
    task = MiniLMTask(None, 128, num_texts)
    arms = build_arms(task.build, peers)
    with torch.inference_mode():
        reference = task.score(arms["fp32"], None)[1]
        cosines = {name: task.score(m, reference)[0] for name, m in arms.items() if name != "bf16"}
        cosines["bf16"] = task.score(arms["bf16"], reference)[0]
    time_model("all-MiniLM-L6-v2", arms, {b: task.inputs(b) for b in BATCHES}, repeats, compile, rows, isa, cosines)
    del arms
    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(1024, 4096), torch.nn.ReLU(), torch.nn.Linear(4096, 4096),
                              torch.nn.GELU(), torch.nn.Linear(4096, 1024)).eval()  # fmt: skip
    arms = build_arms(lambda: copy.deepcopy(mlp), peers)
    x = torch.randn(8, 1024)
    time_model("MLP 1024-4096-4096-1024", arms, {b: x[:b].contiguous() for b in BATCHES}, repeats, compile, rows, isa)
    return rows


def main(
    part: Literal["layers", "decode"] = "layers",
    isas: list[str] = ["native"],  # noqa: B006  (read by jsonargparse, never mutated)
    compile: bool = True,
    repeats: int = 30,
    threads: int = 2,
    num_texts: int = 64,
    decode_arms: list[str] = ["fp32", "bf16", "woq-int8", "woq-int8+head", "woq-int4-g128",  # noqa: B006
                              "woq-int4-g128+head", "ptq-dynamic-int8", "torchao-int8wo", "torchao-int4wo-g128"],
    decode_work_dir: Path = Path("runs/cpu_matrix/decode"),
    out_dir: Path = Path("benchmarks/results"),
    worker_isa: str | None = None,
) -> list[dict]:
    """Args:
    part: ``layers`` (MiniLM + MLP) or ``decode`` (the 1B Llama, through benchmarks/decode.py).
    isas: any of native, avx512-vnni, avx2 (each emulated by oneDNN / ATen ISA caps in its own process).
    compile: also time the compiled arms (the layers part; decode: eager and compiled both).
    repeats: timed calls per arm and batch.
    """
    bad = [i for i in isas if i not in ISAS]
    if bad:
        raise ValueError(f"isas={bad}: valid choices are {', '.join(ISAS)}")
    torch.set_num_threads(threads)
    if worker_isa is not None:
        rows = layers_worker(worker_isa, repeats, compile, num_texts)
        print("RESULT " + json.dumps(rows), flush=True)
        return rows
    from fabric_quant.kernel_report import machine
    from fabric_quant.report import bar_panels, write_report

    rows, machines = [], {}
    for isa in isas:
        env = {**os.environ, **ISAS[isa], "OMP_NUM_THREADS": str(threads)}
        probe = [sys.executable, "-c", "from fabric_quant.kernel_report import machine; print(machine())"]
        probe = subprocess.run(probe, env=env, capture_output=True, text=True, check=True)
        machines[isa] = probe.stdout.strip()
        if part == "decode":
            rows += _decode(isa, env, decode_arms, decode_work_dir)
            continue
        cmd = [sys.executable, __file__, "--worker_isa", isa, "--repeats", str(repeats), "--compile",
               str(compile).lower(), "--threads", str(threads), "--num_texts", str(num_texts)]  # fmt: skip
        out = subprocess.run(cmd, env=env, capture_output=True, text=True)
        lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
        if out.returncode or not lines:
            raise RuntimeError(f"{isa}: exit {out.returncode}: {out.stderr[-2000:]}")
        rows += json.loads(lines[-1][7:])
    command = (f"python benchmarks/cpu_matrix.py --part {part} --isas '{json.dumps(isas)}' --compile"
               f" {str(compile).lower()} --repeats {repeats} --threads {threads}")  # fmt: skip
    header = (
        f"# CPU matrix ({part}) on {machine().split(' (')[0]}\n\nCommand: `{command}`; torch {torch.__version__}."
        " Machine per ISA (what `fabric_quant.kernels.report` sees):\n\n"
        + "\n".join(f"- {isa}: {m}" for isa, m in machines.items())
        + "\n\n`bN_vs_fp32` / `bN_vs_bf16`: eager fp32's / eager bf16's median time over the arm's at batch N, in the"
        " same run and ISA (MiniLM: N sequences of 128 tokens; MLP: N rows). `kernels`: the kernels the arm's"
        " quantized layers ran at batch 1 and 8 (`fabric_quant.kernels.report`; empty for float and peer arms)."
    )
    if part == "decode":
        cols = ["isa", "arm", "compiled", "batch", "decode_tps_total", "tps_vs_bf16", "tps_vs_fp32", "logit_cosine",
                "error"]  # fmt: skip
        plot = None
    else:
        cols = COLUMNS
        labelled = [{**r, "label": f"{r['isa']} {r['model'].split(' ')[0]} {r['arm']}{' (c)' if r['compiled'] else ''}"}
                    for r in rows]  # fmt: skip
        plot = bar_panels(labelled, "label", ["b1_vs_fp32", "b8_vs_fp32"], "vs eager fp32, same run")
    slug = machine().split(" (")[0].lower().replace(" ", "-")
    paths = write_report(rows, cols, out_dir, f"cpu_matrix_{part}_{slug}", header, plot)
    print(paths["markdown"].read_text())
    return rows


def _decode(isa: str, env: dict, arms: list[str], work_dir: Path) -> list[dict]:
    work_dir = work_dir / isa  # its own reference and rows: decode.py merges the rows it finds there
    out_dir = work_dir / "report"
    cmd = [sys.executable, str(Path(__file__).with_name("decode.py")), "--arms", json.dumps(arms), "--work_dir",
           str(work_dir), "--out_dir", str(out_dir), "--compile", "both", "--timeout_s", "1200"]  # fmt: skip
    subprocess.run(cmd, env=env, check=True)
    saved = json.loads(next(work_dir.glob("rows-llama-1b-*.json")).read_text())
    return [{**r, "isa": isa} for r in saved["rows"] if r["arm"] in arms]


if __name__ == "__main__":
    CLI(main, as_positional=False)
