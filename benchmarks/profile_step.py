"""Where a QLoRA training step spends its time: the wall time of every step and the profiler's top operators over
the last two, for this package's recipe and the transformers + peft loop of `qlora_resources.py` (same model, data,
LoRA shape and batch), each arm in its own process.

    python benchmarks/profile_step.py --model llama-1b --accelerator cuda --steps 6
    python benchmarks/profile_step.py --model llama-1b --steps 4            # CPU
    python benchmarks/profile_step.py --model llama-1b --accelerator cuda --steps 3 --first_step true

Prints; writes nothing. Step times are taken at each optimizer step (after a CUDA synchronize), so the first step's
one-time costs show apart from the steady state.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Literal

from jsonargparse import CLI

sys.path.insert(0, str(Path(__file__).resolve().parent))
import qlora_resources as qr

ARMS = ("fabric-quant nf4-dq", "transformers+peft nf4-dq")


def _profile(arm: str, model: str, accelerator: str, steps: int, model_dir: Path, data: Path, top: int,
             first_step: bool) -> None:  # fmt: skip
    from torch.optim.optimizer import register_optimizer_step_post_hook
    from torch.profiler import ProfilerActivity, profile, schedule

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if accelerator == "cuda" else [])
    # the worker times each step at its optimizer step (after a CUDA synchronize); the profiler's windows follow
    # them. With first_step, the one window runs from the start (the load included) to the first optimizer step.
    plan = (schedule(wait=0, warmup=0, active=1, repeat=1) if first_step
            else schedule(wait=max(steps - 2, 0), warmup=0, active=2, repeat=1))
    with profile(activities=activities, schedule=plan) as prof:
        handle = register_optimizer_step_post_hook(lambda *_: prof.step())
        result = qr.worker(arm, model, accelerator, steps, model_dir, data)
        handle.remove()
    times = result.pop("later_steps_s")
    print(f"\n## {arm}: {result}\nstep times from step 2 on (s): {[round(t, 4) for t in times]}")
    key = "self_cuda_time_total" if accelerator == "cuda" else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=top, max_name_column_width=60))
    if accelerator == "cuda":
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=top, max_name_column_width=60))


def main(model: Literal["llama-1b", "llama-3b"] = "llama-1b", accelerator: Literal["cpu", "cuda"] = "cpu",
         steps: int = 6, arms: list[str] | None = None, top: int = 25, first_step: bool = False,
         worker_arm: str | None = None, model_dir: Path | None = None, data: Path | None = None) -> None:  # fmt: skip
    """``first_step``: profile from the start to the first optimizer step (the load and the first step's one-time
    costs) instead of the last two steps."""
    if worker_arm is not None:
        return _profile(worker_arm, model, accelerator, steps, model_dir, data, top, first_step)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir, data = qr.prepare(model, Path(tmp))
        for arm in arms or ARMS:
            cmd = [sys.executable, __file__, "--model", model, "--accelerator", accelerator, "--steps", str(steps),
                   "--top", str(top), "--worker_arm", arm, "--model_dir", str(model_dir), "--data", str(data),
                   "--first_step", str(first_step).lower()]
            subprocess.run(cmd, check=False)
    return None


if __name__ == "__main__":
    CLI(main, as_positional=False)
