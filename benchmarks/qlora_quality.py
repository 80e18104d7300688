"""Accuracy of QLoRA (nf4-dq) against the 16-bit LoRA baseline on the embedded task, same seeds and steps.

    python benchmarks/qlora_quality.py --seeds '[1, 2, 3]'     # writes benchmarks/results/qlora_quality.{md,csv}

Each (mode, seed) is a full run of recipes/qlora.py with configs/qlora/minilm-pydoc-nf4dq.yaml, differing only in
`quantize`; "untrained" is the accuracy of the freshly initialised head before training (same run).
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

from jsonargparse import CLI, ArgumentParser

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "recipes"))

import qlora  # noqa: E402

from fabric_quant.report import machine_name, write_report  # noqa: E402

CONFIG = ROOT / "configs" / "qlora" / "minilm-pydoc-nf4dq.yaml"
COLUMNS = ("quantize", "seed", "untrained_acc", "final_acc", "final_val_loss")


def run(quantize: str | None, seed: int, out_root: Path) -> dict:
    parser = ArgumentParser()
    parser.add_argument("--config", action="config")
    parser.add_function_arguments(qlora.setup)
    out = out_root / f"{quantize}-{seed}"
    args = ["--config", str(CONFIG), "--quantize", str(quantize or "null"), "--seed", str(seed), "--merge", "false",
            "--eval.interval", "null", "--train.save_interval", "null", "--out_dir", str(out)]  # fmt: skip
    cfg = parser.instantiate_classes(parser.parse_args(args))
    cfg.pop("config", None)
    m = qlora.setup(**cfg)
    return {
        "quantize": quantize or "none (bf16 LoRA)", "seed": seed, "untrained_acc": m["initial_eval"]["accuracy"],
        "final_acc": m["final_eval"]["accuracy"], "final_val_loss": m["final_eval"]["loss"],
    }  # fmt: skip


def main(seeds: list[int] = [1, 2, 3], out_dir: Path = Path("benchmarks/results")) -> None:  # noqa: B006
    rows = [run(q, s, Path("runs/qlora_quality")) for s in seeds for q in ("nf4-dq", None)]
    summary = []
    for q in ("nf4-dq", "none (bf16 LoRA)"):
        mine = [r for r in rows if r["quantize"] == q]
        summary.append({
            "quantize": q, "seed": "mean", "final_acc": statistics.mean(r["final_acc"] for r in mine),
            "untrained_acc": statistics.mean(r["untrained_acc"] for r in mine),
        })  # fmt: skip
    gap = 100 * (summary[1]["final_acc"] - summary[0]["final_acc"])
    header = (
        f"# QLoRA vs 16-bit LoRA on the embedded task\n\nCommand: `python benchmarks/qlora_quality.py --seeds"
        f" '{seeds}'`; config {CONFIG.relative_to(ROOT)}; {machine_name()}.\n\nMean accuracy gap (16-bit minus"
        f" nf4-dq): {gap:+.1f} points over {len(seeds)} seeds."
    )
    paths = write_report(rows + summary, COLUMNS, out_dir, "qlora_quality", header)
    print(paths["markdown"].read_text())


if __name__ == "__main__":
    CLI(main, as_positional=False)
