"""Reports as people compare them: a Markdown table, a CSV file and a PNG plot."""

from __future__ import annotations

import csv
import importlib.util
import io
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from fabric_quant.checkpoint import atomic_write_bytes


def measure_latency(fn: Callable[[], object], repeats: int, warmup: int = 2) -> dict[str, float]:
    """Median and spread (interquartile range) of ``fn``'s wall time in milliseconds."""
    return measure_latencies({"fn": fn}, repeats, warmup)["fn"]


def measure_latencies(
    fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 2, inference: bool = True, burst: int = 5
) -> dict[str, dict[str, float]]:
    """Steady-state latency of several candidates, measured in turns (round robin): on a shared machine a slow
    spell then hits every candidate alike, so their ratios stay meaningful. Each turn makes one untimed call
    (it brings the candidate's weights back into cache after the others ran; a server calls one model
    back to back) and then times up to ``burst`` consecutive calls, until ``repeats`` calls are timed.
    ``inference=False`` times training steps (autograd on)."""
    if repeats < 1 or burst < 1:
        raise ValueError(f"repeats and burst must be >= 1, got repeats={repeats}, burst={burst}")
    times: dict[str, list[float]] = {name: [] for name in fns}
    with torch.inference_mode(inference):
        for fn in fns.values():
            for _ in range(warmup):
                fn()
        for turn in range(0, repeats, burst):
            for name, fn in fns.items():
                fn()
                for _ in range(min(burst, repeats - turn)):
                    start = time.perf_counter()
                    fn()
                    times[name].append((time.perf_counter() - start) * 1e3)
    out = {}
    for name, ts in times.items():
        quartiles = statistics.quantiles(ts, n=4) if len(ts) > 1 else [ts[0]] * 3
        out[name] = {"median_ms": statistics.median(ts), "iqr_ms": quartiles[2] - quartiles[0]}
    return out


def _fmt(value: object) -> str:
    if isinstance(value, float):
        if value != value:  # NaN: the quantity does not apply (e.g. bits per quantized param of a float model)
            return "-"
        return f"{value:.4f}" if abs(value) < 10 else f"{value:.1f}"
    return str(value)


def markdown_table(rows: Sequence[dict[str, object]], columns: Sequence[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(_fmt(row.get(c, "")) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def write_report(
    rows: Sequence[dict[str, object]],
    columns: Sequence[str],
    out_dir: str | Path,
    name: str,
    header: str = "",
    plot: Callable[[Path], None] | None = None,
) -> dict[str, Path]:
    """Write ``name.md``, ``name.csv`` (and ``name.png`` via ``plot``) atomically into ``out_dir``."""
    out_dir = Path(out_dir)
    md = (header + "\n\n" if header else "") + markdown_table(rows, columns) + "\n"
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(columns), extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    paths = {
        "markdown": atomic_write_bytes(out_dir / f"{name}.md", md.encode()),
        "csv": atomic_write_bytes(out_dir / f"{name}.csv", buf.getvalue().encode()),
    }
    if plot is not None and check_plotting():
        png = out_dir / f"{name}.png"
        plot(png)
        paths["png"] = png
    return paths


def check_plotting() -> bool:
    """Whether the PNG plots can be drawn; without matplotlib says so (recipes call this before measuring, so a
    missing plot library is known at once, not after minutes of work) and the reports skip the PNG."""
    if importlib.util.find_spec("matplotlib") is not None:
        return True
    print("matplotlib is not installed: reports are written as Markdown and CSV, without the PNG plot"
          " (pip install matplotlib, or fabric-quant[demo])")  # fmt: skip
    return False


def bar_panels(
    rows: Sequence[dict[str, object]], label: str, metrics: Sequence[str], title: str
) -> Callable[[Path], None]:
    """One horizontal bar panel per metric, one bar per row; written atomically as PNG."""

    def draw(path: Path) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        names = [str(row[label]) for row in rows]
        fig, axes = plt.subplots(1, len(metrics), figsize=(4 * len(metrics), 0.45 * len(rows) + 1.5), sharey=True)
        axes = list(axes) if len(metrics) > 1 else [axes]
        axes[0].invert_yaxis()  # first row on top; the y axis is shared, so invert it once
        for ax, metric in zip(axes, metrics, strict=True):
            values = [float(row[metric]) for row in rows]
            ax.barh(names, values, color="tab:blue")
            for y, v in enumerate(values):
                ax.annotate(_fmt(v), (v, y), xytext=(3, 0), textcoords="offset points", va="center", fontsize=8)
            ax.set_title(metric, fontsize=10)
            ax.margins(x=0.25)
            if metric.startswith("cosine"):
                ax.set_xlim(min(values) - 0.05, 1.01)
        save_figure(fig, path, title)

    return draw


def save_figure(fig, path: Path, title: str) -> None:
    """Title, lay out and write a matplotlib figure as PNG, atomically, and close it."""
    import matplotlib.pyplot as plt

    fig.suptitle(title)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def peak_rss_mb() -> float:
    """This process's peak resident set size in MB. On Linux from ``/proc/self/status`` (VmHWM): ``getrusage``'s
    ru_maxrss survives ``exec``, so a process started by a large parent reports the parent's size as its own."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    scale = 1024 if platform.system() == "Linux" else 1024 * 1024  # KiB on Linux, bytes on macOS
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / scale


def peak_memory_mb(device: torch.device | str) -> float:
    """Peak memory of this process on ``device``: CUDA's allocator peak, or the peak RSS."""
    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return peak_rss_mb()


def machine_name() -> str:
    """The CPU model (Linux), else what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
