"""How much error the weight-only quantizers put into a model's output, and where it comes from: a random-weight
Llama-3.2-1B shape (what benchmarks/decode.py measures) against a trained encoder (all-MiniLM-L6-v2, real text).

    python benchmarks/woq_fidelity.py --model llama-1b                    # the decode benchmark's random model
    python benchmarks/woq_fidelity.py --model minilm                      # trained weights, pydoc paragraphs
    python benchmarks/woq_fidelity.py --model llama-1b --arms '[int4-g128-lsq]'   # a piece; rows merge
Writes benchmarks/results/woq_fidelity_<model>.{md,csv,png}.

Per arm, every Linear the woq modes quantize (the output head stays float, as by default) is quantized with
``WOQLinear.from_float`` and measured three ways: ``weight_rel_err`` = ||W_q - W|| / ||W|| over all of them;
``linear_out_rel_err`` = the mean over layers of ||x W_q^T - x W^T|| / ||x W^T|| with ``x`` the layer's own input in
the reference model (fp32 products: the weight's error alone, on real activations); ``hidden_rel_err_*`` = the
relative error of the residual stream after each block (``output_hidden_states``) against the reference model, and
``growth`` = its final value over ``linear_out_rel_err`` (how much the model amplifies one layer's error). The
output score is the cosine of the logits to the reference's at every prompt position (Llama; plus top-1 agreement)
or of the mean-pooled sentence embeddings (MiniLM). References: bf16 (Llama, as in decode.py: the quantized arms
run bf16 activations on the kernels) and fp32 (MiniLM: fp32 activations, the kernels run them in bf16).

Arms: ``int8``; ``int4-g<G>`` (min / max per group), ``-mse`` (the library's ``scale_search="mse"``) and ``-lsq``
(an experiment, not a library option: from the mse result, 10 rounds of a least-squares refit of each group's
scale and zero to its codes, codes re-rounded, the lowest-error (scale, zero) per group kept: the MSE-refinement
half of HQQ-style quantizers), ``-gptq`` (the library's ``scale_search="gptq"``, calibrated on inputs disjoint from
the scored ones: MiniLM the next 128 pydoc paragraphs, Llama 16 other random prompts of 512 tokens); ``fp32`` /
``bf16``: the other float dtype, no weight error (a yardstick). ``bound-<R>bits``: no quantizer, a bound: each
weight matrix replaced by a draw from the Gaussian rate-distortion test channel at ``R`` bits per weight
(:func:`rd_channel`), the smallest mean squared weight error that any code of ``R`` bits per weight can reach on
i.i.d. Gaussian weights, the random Llama's (transformers draws them from N(0, 0.02^2)). 4.25 is int4 g128's
rate with its scales and zeros; 3.32 gives int4 g128's measured 10 % weight error, to check that Gaussian noise of
that size costs what the quantizer's error costs. On trained weights (not Gaussian) the arm is no bound.
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import sys
import time
from pathlib import Path
from typing import Literal

import torch
from jsonargparse import CLI

sys.path.insert(0, str(Path(__file__).resolve().parent))

# arm -> (bits or None for a float arm, group size, scale search, float dtype of the arm or None: the model's)
ARMS = {
    "fp32": (None, None, None, torch.float32),
    "bf16": (None, None, None, torch.bfloat16),
    "int8": (8, None, "none", None),
    "int4-g128": (4, 128, "none", None),
    "int4-g128-mse": (4, 128, "mse", None),
    "int4-g128-lsq": (4, 128, "lsq", None),
    "int4-g128-gptq": (4, 128, "gptq", None),
    "int4-g32": (4, 32, "none", None),
    "int4-g32-mse": (4, 32, "mse", None),
    # no quantizer: the best any code of this many bits per weight can do on Gaussian weights (see rd_channel)
    **{f"bound-{b}bits": (b, None, "bound", None) for b in (3.32, 4.25, 5.0, 6.0)},
}
COLUMNS = ("arm", "reference", "weight_rel_err", "linear_out_rel_err", "hidden_rel_err_first", "hidden_rel_err_final",
           "growth", "output_cosine", "top1_agreement", "quantize_s", "hidden_rel_err_by_block")  # fmt: skip
CAPTURE_ROWS = 512  # rows of each layer's input kept for linear_out_rel_err (the first batch's)
LSQ_ROUNDS = 10


def lsq_int4(weight: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """int4 codes, bf16 scales and zeros as ``quantize_int4(..., "mse")``, then refined: per group, the scale and
    zero that fit ``w = (q - 8) * s + z`` best in least squares for the current codes, rounded to bf16, codes
    re-rounded; a group keeps the pair with the lowest reconstruction error seen."""
    from fabric_quant.nn.woq import quantize_int4

    q, scale, zero = quantize_int4(weight, group_size, "mse")
    groups = weight.detach().float().reshape(weight.shape[0], -1, group_size)  # in_features % group_size == 0 here

    def error(q, s, z):
        return ((q.float() - 8) * s.float()[..., None] + z.float()[..., None] - groups).square().sum(-1)

    q = q.reshape(groups.shape)
    best = error(q, scale, zero)
    for _ in range(LSQ_ROUNDS):
        c = q.float() - 8
        cm, wm = c.mean(-1, keepdim=True), groups.mean(-1, keepdim=True)
        var, cov = (c - cm).square().sum(-1), ((c - cm) * (groups - wm)).sum(-1)
        s = torch.where(var > 0, cov / var.clamp(min=1e-12), scale.float()).clamp(min=torch.finfo(torch.float32).eps)
        s = s.to(torch.bfloat16)
        z = (wm[..., 0] - s.float() * cm[..., 0]).to(torch.bfloat16)
        q = torch.clamp(torch.round((groups - (z.float() - 8 * s.float())[..., None]) / s.float()[..., None]), 0, 15)
        err = error(q, s, z)
        better = err < best
        best, scale, zero = torch.where(better, err, best), torch.where(better, s, scale), torch.where(better, z, zero)
    s, z = scale.float()[..., None], zero.float()[..., None]
    q = torch.clamp(torch.round((groups - (z - 8 * s)) / s), 0, 15).to(torch.uint8).reshape(weight.shape)
    return q, scale, zero


def rd_channel(weight: torch.Tensor, bits: float, generator: torch.Generator) -> torch.Tensor:
    """A draw from the test channel that achieves the distortion-rate function of a Gaussian source,
    ``D(R) = sigma^2 2^(-2R)``: ``W_hat = (1 - r^2) W + r sqrt(1 - r^2) sigma Z`` with ``r = 2^-R``, so that
    ``W = W_hat + E`` with ``E`` independent of ``W_hat`` and ``||W_hat - W|| / ||W|| = r`` (in expectation).
    ``sigma`` is the matrix's own standard deviation."""
    w = weight.detach().float()
    r, sigma = 2.0**-bits, float(w.std())
    z = torch.randn(w.shape, generator=generator)
    return (1 - r * r) * w + (r * math.sqrt(1 - r * r) * sigma) * z


class Subject:
    """A model family: how to load it fresh, its inputs, and its output vectors and hidden states."""

    reference: torch.dtype
    top1: bool

    def load(self, dtype: torch.dtype) -> torch.nn.Module: ...
    def batches(self) -> list[dict]: ...
    def calibration(self) -> list[dict]: ...

    def run(self, model, batch) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(output rows, hidden states of the real tokens, one (tokens, hidden) tensor per block boundary)"""
        out = model(**batch, output_hidden_states=True)
        keep = batch["attention_mask"].bool() if "attention_mask" in batch else None
        hidden = [(h[keep] if keep is not None else h.flatten(0, 1)).float() for h in out.hidden_states]
        return self.output(out, batch), hidden


class Llama(Subject):
    reference, top1 = torch.bfloat16, True

    def __init__(self, model: str, work_dir: Path, prompt_tokens: int) -> None:
        self.model, self.work_dir, self.prompt_tokens = model, work_dir, prompt_tokens

    def load(self, dtype):
        from decode import build_checkpoint

        import fabric_quant as fq

        path = build_checkpoint(self.model, self.work_dir / "model")
        return fq.from_pretrained(path, None, task="causal-lm", dtype=dtype, device="cpu", progress=False).eval()

    def batches(self):
        from transformers import AutoConfig

        vocab = AutoConfig.from_pretrained(self.work_dir / "model").vocab_size
        gen = torch.Generator().manual_seed(1)  # decode.py's batch-1 prompt
        return [{"input_ids": torch.randint(vocab, (1, self.prompt_tokens), generator=gen)}]

    def calibration(self):
        from transformers import AutoConfig

        vocab = AutoConfig.from_pretrained(self.work_dir / "model").vocab_size
        gen = torch.Generator().manual_seed(2)
        # 16 x 512 = 8192 tokens, as many as the widest layer's inputs (down_proj): with fewer, H is rank-deficient
        # and GPTQ fits the calibration prompts rather than the layer (4 x 128 tokens: cosine 0.603, below plain's)
        return [{"input_ids": torch.randint(vocab, (1, 512), generator=gen)} for _ in range(16)]

    def output(self, out, batch):
        return out.logits[0].float()  # every prompt position


class MiniLM(Subject):
    reference, top1 = torch.float32, False

    def __init__(self, num_texts: int, seq_len: int) -> None:
        from transformers import AutoTokenizer

        from fabric_quant.demo.data import topic_paragraphs
        from fabric_quant.demo.models import minilm_path

        self.path, self.num_texts, self.seq_len = minilm_path(), num_texts, seq_len
        self.tok = AutoTokenizer.from_pretrained(self.path)
        self.texts = [text for _, text in topic_paragraphs()][:num_texts]
        self.calibration_texts = [text for _, text in topic_paragraphs()][num_texts : num_texts + 128]

    def load(self, dtype):
        from transformers import AutoModel

        return AutoModel.from_pretrained(self.path, dtype=dtype).eval()

    def batches(self, texts=None):
        texts = self.texts if texts is None else texts
        return [dict(self.tok(texts[i : i + 32], padding="longest", truncation=True, max_length=self.seq_len,
                              return_tensors="pt")) for i in range(0, len(texts), 32)]  # fmt: skip

    def calibration(self):
        return self.batches(self.calibration_texts)

    def output(self, out, batch):
        hidden, mask = out.last_hidden_state.float(), batch["attention_mask"].unsqueeze(-1).float()
        return torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)


def reference_pass(subject: Subject) -> tuple[list, list, dict[str, torch.Tensor]]:
    """The reference's outputs and hidden states per batch, and each Linear's input rows (first batch)."""
    model = subject.load(subject.reference)
    inputs, hooks = {}, []
    for name, module in model.named_modules():
        if type(module) is torch.nn.Linear:

            def keep(mod, args, name=name):
                inputs.setdefault(name, args[0].reshape(-1, args[0].shape[-1])[:CAPTURE_ROWS].detach().clone())

            hooks.append(module.register_forward_pre_hook(keep))
    outputs, hidden = [], []
    with torch.inference_mode():
        for batch in subject.batches():
            out, hs = subject.run(model, batch)
            outputs.append(out)
            hidden.append(hs)
    for hook in hooks:
        hook.remove()
    return outputs, hidden, inputs


def quantize_arm(model, arm: str, inputs: dict[str, torch.Tensor], subject: Subject) -> dict:
    """Replace the Linears the woq modes target with WOQLinear (per the arm), measuring the error of each."""
    import fabric_quant as fq
    from fabric_quant.nn.woq import WOQLinear, pack_nibbles
    from fabric_quant.woq import WOQConfig, woq_targets

    bits, group, search, _ = ARMS[arm]
    names, _ = woq_targets(model, WOQConfig.create(f"woq-int{8 if bits == 8 else 4}", group_size=group))
    originals = {}
    generator = torch.Generator().manual_seed(0)
    if search == "gptq":  # the library call, on the model: calibration batches run through it (float weights kept)
        originals = {name: model.get_submodule(name).weight.detach().float().clone() for name in names}
        fq.quantize_(model, "woq-int4", group_size=group, scale_search="gptq", calibration_data=subject.calibration())
    err_sq, ref_sq, out_errs = 0.0, 0.0, []
    for name in names:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        child = getattr(parent, attr)
        if search == "gptq":
            w, new = originals.pop(name), child
        elif search == "bound":  # the float layer, its weight replaced by a draw from the channel (model dtype)
            w, new = child.weight.detach().float().clone(), child
            child.weight.data.copy_(rd_channel(w, bits, generator))
        else:  # one float layer at a time
            w = child.weight.detach().float()
            new = WOQLinear.from_float(child, bits, group, "mse" if search == "lsq" else search)
        if search == "lsq":
            q, new.scales, new.zeros = lsq_int4(w, group)
            new.qweight = pack_nibbles(q)
            new._clear_caches()  # the kernel layout is built from the codes on first use
        dq = new.weight.detach().float() if search == "bound" else new.dequantized_weight()
        err_sq += float((dq - w).square().sum())
        ref_sq += float(w.square().sum())
        x = inputs[name].float()
        y = x @ w.T
        out_errs.append(float((x @ dq.T - y).norm() / y.norm().clamp(min=1e-30)))
        setattr(parent, attr, new)
    return {"weight_rel_err": math.sqrt(err_sq / ref_sq), "linear_out_rel_err": sum(out_errs) / len(out_errs)}


def measure(subject: Subject, arm: str, reference: tuple) -> dict:
    ref_out, ref_hidden, inputs = reference
    bits, _, _, dtype = ARMS[arm]
    model = subject.load(dtype or subject.reference)
    start = time.perf_counter()
    row = {"arm": arm, "reference": str(subject.reference).removeprefix("torch.")}
    if bits is not None:
        row |= quantize_arm(model, arm, inputs, subject)
    else:
        row |= {"weight_rel_err": 0.0, "linear_out_rel_err": float("nan")}
    row["quantize_s"] = time.perf_counter() - start
    cosines, agree, n = [], 0, 0
    diff_sq, norm_sq = None, None
    with torch.inference_mode():
        for batch, r_out, r_hidden in zip(subject.batches(), ref_out, ref_hidden, strict=True):
            out, hidden = subject.run(model, batch)
            cosines.append(torch.nn.functional.cosine_similarity(out, r_out, dim=-1))
            agree, n = agree + int((out.argmax(-1) == r_out.argmax(-1)).sum()), n + out.shape[0]
            d = [float((h - r).square().sum()) for h, r in zip(hidden, r_hidden, strict=True)]
            s = [float(r.square().sum()) for r in r_hidden]
            diff_sq = d if diff_sq is None else [a + b for a, b in zip(diff_sq, d, strict=True)]
            norm_sq = s if norm_sq is None else [a + b for a, b in zip(norm_sq, s, strict=True)]
    by_block = [math.sqrt(a / b) for a, b in zip(diff_sq, norm_sq, strict=True)][1:]  # [0]: the embeddings
    row |= {"hidden_rel_err_first": by_block[0], "hidden_rel_err_final": by_block[-1],
            "output_cosine": float(torch.cat(cosines).mean()),
            "top1_agreement": agree / n if subject.top1 else float("nan"),
            "hidden_rel_err_by_block": " ".join(f"{v:.3g}" for v in by_block)}  # fmt: skip
    row["growth"] = row["hidden_rel_err_final"] / row["linear_out_rel_err"] if bits is not None else float("nan")
    print(row, flush=True)
    return row


def _read_rows(path: Path) -> list[dict]:
    """Rows of an earlier report (CSV), numbers parsed back, so runs in pieces merge."""
    if not path.is_file():
        return []
    with open(path) as f:
        rows = list(csv.DictReader(f))
    for row in rows:
        for key, value in row.items():
            with contextlib.suppress(ValueError):
                row[key] = float(value)
    return rows


def _plot(rows: list[dict], title: str):
    def draw(path: Path) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        from fabric_quant.report import save_figure

        fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
        for row in rows:
            values = [float(v) for v in str(row["hidden_rel_err_by_block"]).split()]
            left.plot(range(1, len(values) + 1), values, marker=".", label=row["arm"])
        left.set_yscale("log")
        left.set_xlabel("block")
        left.set_ylabel("relative error of the hidden state")
        left.grid(alpha=0.3)
        left.legend(fontsize=7)
        right.barh([r["arm"] for r in rows], [float(r["output_cosine"]) for r in rows])
        right.invert_yaxis()
        right.set_xlabel("output cosine vs reference")
        right.set_xlim(min(float(r["output_cosine"]) for r in rows) - 0.02, 1.0)
        right.grid(alpha=0.3)
        save_figure(fig, path, title)

    return draw


def main(
    model: Literal["llama-1b", "minilm", "tiny"] = "llama-1b",
    arms: list[str] | None = None,
    work_dir: Path | None = None,
    prompt_tokens: int = 128,
    num_texts: int = 128,
    seq_len: int = 128,
    out_dir: Path = Path("benchmarks/results"),
) -> list[dict]:
    """Args:
    model: llama-1b (decode.py's random model, checkpoint in work_dir/model, built if missing), minilm
        (all-MiniLM-L6-v2, trained) or tiny (a tiny random Llama, for tests).
    arms: any of the ARMS names (default: the quantized ones and the other float dtype).
    work_dir: llama-1b / tiny: where the random checkpoint is (decode.py's --work_dir; default runs/decode/<model>).
    prompt_tokens: llama: random prompt length (decode.py's batch-1 prompt).
    num_texts: minilm: pydoc paragraphs scored.
    seq_len: minilm: tokens per paragraph (truncated).
    out_dir: where the report goes; rows of other arms already there are kept.
    """
    from fabric_quant.report import check_plotting, write_report

    bounds = model != "minilm"  # a bound only on Gaussian weights
    default = [a for a in ARMS if ARMS[a][0] is not None and (bounds or ARMS[a][2] != "bound")]
    default += ["bf16"] if model == "minilm" else ["fp32"]
    arms = default if arms is None else arms
    bad = [a for a in arms if a not in ARMS]
    if bad:
        raise ValueError(f"arms={bad}: valid choices are {', '.join(ARMS)}")
    check_plotting()
    subject = (
        MiniLM(num_texts, seq_len)
        if model == "minilm"
        else Llama(model, Path(work_dir or f"runs/decode/{model}"), prompt_tokens)
    )
    reference = reference_pass(subject)
    new = [measure(subject, arm, reference) for arm in arms]
    name = f"woq_fidelity_{model}"
    kept = [r for r in _read_rows(Path(out_dir) / f"{name}.csv") if r["arm"] not in arms]
    rows = sorted(kept + new, key=lambda r: list(ARMS).index(r["arm"]))
    command = f"python benchmarks/woq_fidelity.py --model {model} --arms '{json.dumps(arms)}'" + "".join(
        f" --{k} {v}"
        for k, v in (("work_dir", work_dir), ("out_dir", out_dir))
        if v not in (None, Path("benchmarks/results"))
    )
    what = ("Llama-3.2-1B shape, random weights (decode.py's checkpoint)" if model == "llama-1b" else
            "all-MiniLM-L6-v2 (trained), pydoc paragraphs" if model == "minilm" else "tiny random Llama")  # fmt: skip
    header = (
        f"# Weight-only quantization fidelity: {what}\n\nLast command: `{command}` (rows of other arms from earlier"
        f" runs kept). torch {torch.__version__}, {torch.get_num_threads()} threads. Reference:"
        f" {subject.reference} model. weight_rel_err: ||W_q - W|| / ||W|| over the quantized Linears;"
        " linear_out_rel_err: mean over layers of the output error on the layer's own reference input (fp32"
        f" products, first {CAPTURE_ROWS} rows); hidden_rel_err_*: the residual stream after the first / last block"
        " (and every block) vs the reference; growth = hidden_rel_err_final / linear_out_rel_err; output_cosine:"
        " logits at every prompt position (Llama) or mean-pooled sentence embeddings (MiniLM); top1_agreement:"
        " argmax equal to the reference's (Llama). See the script's docstring for the arms."
    )
    write_report(rows, COLUMNS, out_dir, name, header, _plot(rows, f"woq fidelity ({model})"))
    return rows


if __name__ == "__main__":
    CLI(main, as_positional=False)
