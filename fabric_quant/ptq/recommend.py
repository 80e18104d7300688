"""``recommend``: the notes' "choose an approach" table, measured on the user's model and data.

The table: RNNs and Transformers (Linear-dominated) -> dynamic quantization; CNNs -> static quantization; QAT
when static loses too much accuracy. ``recommend`` proposes from the layer types, then quantizes with each
applicable scheme, measures the metric drop and the speed-up on this machine, and ranks the candidates.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch

from fabric_quant.calibration import call_model
from fabric_quant.footprint import footprint
from fabric_quant.kernels import can_compile, compile_model
from fabric_quant.nn.rnn import RNN_TYPES
from fabric_quant.ptq.dynamic import quantize_dynamic
from fabric_quant.ptq.static import quantize_static
from fabric_quant.report import markdown_table, measure_latencies


@dataclass
class Candidate:
    scheme: str
    metric: float
    drop: float
    """Baseline metric minus this scheme's (positive = worse)."""
    latency_ms: float
    speedup: float
    size_mb: float
    within_tolerance: bool
    model: torch.nn.Module = field(repr=False)


@dataclass
class Recommendation:
    proposed: str
    """What the layer types suggest before measuring (the notes' table)."""
    best: str
    """The fastest scheme within the tolerance, or ``"qat"`` / ``"fp32"`` when none is."""
    advice: str
    candidates: list[Candidate]
    """fp32 first, then the quantized schemes fastest first."""

    def markdown(self) -> str:
        columns = ["scheme", "metric", "drop", "latency_ms", "speedup", "size_mb", "within_tolerance"]
        rows = [{c: getattr(cand, c) for c in columns} for cand in self.candidates]
        from fabric_quant.kernel_report import machine

        # the speed-ups hold for this CPU only: which int8 kernels exist differs by ISA (nn/cpu_isa.py)
        return f"Measured on {machine()}.\n\n{markdown_table(rows, columns)}\n\n**{self.best}**: {self.advice}\n"


def layer_profile(model: torch.nn.Module) -> dict[str, int]:
    """Parameter counts per layer kind (conv, recurrent, linear)."""
    counts = {"conv": 0, "recurrent": 0, "linear": 0}
    for m in model.modules():
        own = sum(p.numel() for p in m.parameters(recurse=False))
        if isinstance(m, torch.nn.Conv1d | torch.nn.Conv2d):
            counts["conv"] += own
        elif isinstance(m, RNN_TYPES):
            counts["recurrent"] += own
        elif isinstance(m, torch.nn.Linear):
            counts["linear"] += own
    return counts


def propose(counts: dict[str, int], model_name: str) -> str:
    """The notes' table on a :func:`layer_profile`: conv-dominated -> static, Linear/RNN-dominated -> dynamic."""
    if not any(counts.values()):
        raise TypeError(f"{model_name} has no Linear, Conv1d/2d, LSTM or GRU layer to quantize")
    return "static" if counts["conv"] >= max(counts["linear"], counts["recurrent"]) else "dynamic"


def recommend(
    model: torch.nn.Module,
    eval_fn: Callable[[torch.nn.Module, object], float],
    val_data: object,
    *,
    tolerance: float = 0.01,
    calibration_data: Iterable | None = None,
    example_input: object = None,
    repeats: int = 20,
    compile: bool = False,
    autotune: bool = False,
    weight_only: bool = False,
) -> Recommendation:
    """Measure the applicable PTQ schemes on ``model`` and rank them.

    Args:
        eval_fn: ``eval_fn(model, val_data) -> metric`` where higher is better (e.g. accuracy in [0, 1]).
        tolerance: largest acceptable metric drop (same units as the metric).
        calibration_data: batches of model inputs for static quantization (static is skipped without them).
        example_input: one model input for the latency measurement (default: the first calibration batch).
        repeats: timed calls per candidate (candidates measured in turns, median reported).
        compile: time every candidate (fp32 too) as :func:`~fabric_quant.kernels.compile_model` compiles it: how
            int8 pays off for transformers on CPU (eager int8 there is often no faster than fp32). The metric is
            measured on the eager models (same numbers) and the candidates keep their eager model.
        autotune: with ``compile``, ``compile_model(autotune=True)`` (GEMM autotuning; slower compilation).
        weight_only: also measure ``woq-int8`` and ``woq-int4`` (:mod:`fabric_quant.woq`: integer weights, float
            activations), the schemes for batch-1 decoding, where a Linear layer's time is reading its weight.
    """
    if tolerance < 0:
        raise ValueError(f"tolerance must be >= 0, got {tolerance}")
    if autotune and not compile:
        raise ValueError("recommend(autotune=True) tunes the compiled candidates: it needs compile=True")
    if compile and not can_compile():
        raise RuntimeError("recommend(compile=True) needs a C++ compiler (g++ or clang++) for inductor")
    counts = layer_profile(model)
    proposed = propose(counts, type(model).__name__)
    calibration = list(calibration_data) if calibration_data is not None else None
    if calibration is not None and not calibration:
        raise ValueError("calibration_data is empty: pass batches of model inputs, or None to skip static")
    if example_input is None:
        if not calibration:
            raise ValueError("example_input is required for the latency measurement when no calibration_data is given")
        example_input = calibration[0]
    models = _candidate_models(copy.deepcopy(model).eval(), counts, calibration, weight_only)
    with torch.no_grad():
        metrics = {name: float(eval_fn(m, val_data)) for name, m in models.items()}
    timed = {n: compile_model(m, autotune=autotune) if compile else m for n, m in models.items()}
    latency = measure_latencies({n: (lambda m=m: call_model(m, example_input)) for n, m in timed.items()}, repeats)
    base_ms = latency["fp32"]["median_ms"]
    candidates = []
    for name, m in models.items():
        drop, ms = metrics["fp32"] - metrics[name], latency[name]["median_ms"]
        size = footprint(m).total_bytes / 1e6
        candidates.append(Candidate(name, metrics[name], drop, ms, base_ms / ms, size, drop <= tolerance, m))
    ranked = [candidates[0], *sorted(candidates[1:], key=lambda c: (not c.within_tolerance, c.latency_ms))]
    best, advice = _advice(ranked, tolerance, compile)
    return Recommendation(proposed, best, advice, ranked)


def _candidate_models(model: torch.nn.Module, counts: dict[str, int], calibration: list | None,
                      weight_only: bool) -> dict[str, torch.nn.Module]:  # fmt: skip
    """fp32 (``model`` itself) and every scheme that applies to its layers, each quantized from a copy of it."""
    models: dict[str, torch.nn.Module] = {"fp32": model}
    if counts["linear"] or counts["recurrent"]:
        models["dynamic"] = quantize_dynamic(model)
    if calibration and (counts["linear"] or counts["conv"]):
        models["static"] = quantize_static(model, calibration, progress=False)
    if weight_only and counts["linear"]:
        from fabric_quant.woq import quantize_woq  # a sibling family, imported only when asked for

        for mode in ("woq-int8", "woq-int4"):
            models[mode] = quantize_woq(copy.deepcopy(model), mode)
    return models


def _advice(ranked: list[Candidate], tolerance: float, compile: bool) -> tuple[str, str]:
    """The scheme to use and why, from the ranked candidates (fp32 first)."""
    ok = [c for c in ranked[1:] if c.within_tolerance]
    static = next((c for c in ranked if c.scheme == "static"), None)
    if ok and ok[0].speedup > 1:
        best = ok[0].scheme
        speed = f"{ok[0].speedup:.2f}x fp32 speed{' (both compiled)' if compile else ''}"
        advice = f"{best} keeps the metric within {tolerance} ({ok[0].drop:+.4f}) at {speed}"
    elif ok:
        smallest = min(ok, key=lambda c: c.size_mb)
        best = "fp32"
        advice = (f"the quantized schemes stay within {tolerance} but none is faster than fp32 on this machine"
                  f" (too small to amortise the int8 kernels' overhead{'' if compile else '; try compile=True'});"
                  f" for size, {smallest.scheme} is"
                  f" {ranked[0].size_mb / smallest.size_mb:.1f}x smaller")  # fmt: skip
    elif static is not None:
        best = "qat"
        advice = (f"static quantization loses {static.drop:.4f} > tolerance {tolerance}: train with QAT "
                  "(QATPrecision('qat-int8-static')) to recover it")  # fmt: skip
    else:
        best = "fp32"
        advice = f"no scheme stays within {tolerance}; pass calibration_data to try static, or use QAT"
    if static is not None and not static.within_tolerance and best != "qat":
        advice += f"; static loses {static.drop:.4f} (> tolerance): QAT would be the way to use static int8"
    return best, advice
