"""Which integer kernels this machine runs, chosen once, with a portable fallback.

Backends:
- ``x86``: oneDNN's int8 kernels (AMX-INT8 / AVX512-VNNI; which one and how: ``nn/cpu_isa.py``), reached
  through maintained torch core ops (``torch.ops.onednn.qconv_pointwise``, and ``torch._int_mm`` GEMMs that
  inductor lowers to ``onednn.qlinear_pointwise`` under :func:`compile_model`).
- ``reference``: portable: ``torch._int_mm`` for Linear, float convolution on the dequantized int8 weight.

Nothing here imports ``torch.ao.quantization``.
"""

from __future__ import annotations

import functools
import shutil

import torch

from fabric_quant.kernel_report import KernelReport, report  # noqa: F401  (fq.kernels.report: the kernel per layer)
from fabric_quant.nn.cpu_isa import cpu_features, int8_gemm, is_x86  # noqa: F401  (cpu_features: public here)

BACKENDS = ("auto", "x86", "reference")


@functools.cache
def onednn_int8_available() -> bool:
    """True when the oneDNN int8 convolution op exists and this is an x86 CPU with exact kernels for it (VNNI or
    AMX: without VNNI oneDNN halves the weights to keep int16 sums from saturating; ``nn/cpu_isa.py``)."""
    has_ops = hasattr(torch.ops.onednn, "qconv_pointwise") and hasattr(torch.ops.onednn, "qconv_prepack")
    return is_x86() and has_ops and torch.backends.mkldnn.is_available() and int8_gemm() != "float"


def select_backend(name: str = "auto") -> str:
    """Resolve a backend name; ``auto`` picks ``x86`` where oneDNN's int8 kernels run, else ``reference``."""
    if name not in BACKENDS:
        raise ValueError(
            f"Unknown backend {name!r}. Valid choices: {', '.join(BACKENDS)} (fbgemm/qnnpack belong to the"
            " deprecated torch.ao.quantization stack; 'x86' is oneDNN, 'reference' is portable)"
        )
    if name == "x86" and not onednn_int8_available():
        raise RuntimeError("backend='x86' needs an x86 CPU and torch built with oneDNN; use 'auto' or 'reference'")
    if name == "auto":
        return "x86" if onednn_int8_available() else "reference"
    return name


def can_compile() -> bool:
    """torch.compile on CPU (inductor) needs a C++ compiler."""
    return shutil.which("g++") is not None or shutil.which("clang++") is not None


def check_autotune(compile: bool, autotune: bool) -> None:
    """A recipe's ``autotune`` only applies to its compiled rows: refuse it without ``compile`` before any work."""
    if autotune and not compile:
        raise ValueError("autotune=True tunes the compiled rows: it needs compile=True (got compile=False)")


def _inference_config(autotune: bool):
    import torch._inductor.config as inductor_config

    # freezing: constant-fold and prepack weights (the int8 GEMM lowering needs it; see _unmark_static_inputs for
    # what it does to static-address inputs such as a KV cache). realize_opcount_threshold:
    # a per-token quantization reads the previous op's result twice (row absmax, then rounding); inductor stores
    # a twice-read result instead of recomputing it only when its expression has more ops than this (CPU default
    # 50; a bias + GELU + scaling needs <= 5 to be stored), so a GELU's erf runs once per element, not twice.
    options = {"freezing": True, "realize_opcount_threshold": 5}
    if autotune:
        # max-autotune times inductor's own C++ GEMM template (AMX / AVX512 micro-kernels, the scaling, bias and
        # activation fused as its epilogue) against the library call (oneDNN's qlinear builds its primitive
        # descriptor on every call, a fixed cost that dominates small GEMMs) and keeps the faster per shape
        options |= {"max_autotune": True, "max_autotune_gemm_backends": "CPP,ATEN"}
    return inductor_config.patch(**options)


def _unmark_static_inputs(objs, depth: int = 6) -> None:
    """Drop the unguarded static-address mark (``torch._dynamo.mark_static_address(t)``) from the tensors reachable
    from a call's arguments, so that under freezing dynamo lifts them as graph inputs instead of baking them in.

    With inductor's freezing on (torch 2.13), dynamo installs every static input as a graph attribute. Those it
    marks itself (parameters) are guarded by identity; one its caller marked with the default ``guard=False``
    (transformers' ``StaticCache`` does, for each layer's keys, values and ``cumulative_length`` write position) is
    guarded by shape and dtype only. ``generate`` builds a new cache per call: the next call with the same shapes
    reuses the graph, which still reads and writes the first call's cache (wrong logits), and the stale write
    position soon runs past the end (``index out of bounds: 0 <= tmpN < <max_cache_len>L``). Lifted as inputs, as
    under plain ``torch.compile``, one graph serves every cache of the same shape. The mark only gives CUDA graphs
    a fixed address; guarded marks (``guard=True``) are kept: they recompile for a new tensor, which is correct.
    """
    stack, seen = [(obj, depth) for obj in objs], set()
    while stack:
        obj, left = stack.pop()
        if isinstance(obj, torch.Tensor):
            if getattr(obj, "_dynamo_static_input_type", None) == "unguarded" and not isinstance(
                obj, torch.nn.Parameter
            ):
                del obj._dynamo_static_input_type
            continue
        if left == 0 or id(obj) in seen or obj is None or isinstance(obj, (str, bytes, int, float, bool)):
            continue
        seen.add(id(obj))
        if isinstance(obj, dict):
            stack.extend((v, left - 1) for v in obj.values())
        elif isinstance(obj, (list, tuple)):
            stack.extend((v, left - 1) for v in obj)
        elif not isinstance(obj, (torch.nn.Module, type)) and isinstance(getattr(obj, "__dict__", None), dict):
            # plain objects (a Cache, its layers); not modules: their tensors are parameters and buffers
            stack.extend((v, left - 1) for v in vars(obj).values())


def compile_model(model: torch.nn.Module, autotune: bool = False, **compile_kwargs) -> torch.nn.Module:
    """``torch.compile`` for inference with inductor's freezing passes on, which constant-fold the int8 weights,
    prepack them for oneDNN and lower the converted layers' ``_int_mm -> scale`` pattern to one int8 GEMM with the
    activation quantization fused into the preceding kernel. The first call compiles (seconds to a minute).

    ``autotune=True`` also benchmarks inductor's C++ GEMM template against the library kernel for every GEMM shape
    and keeps the faster (``max-autotune`` restricted to the CPU backends): the fastest model at small batch, for a
    compilation several times longer (results are cached on disk for the next process).
    Caches passed as arguments (transformers' ``StaticCache``, a new one per ``generate`` call) are graph inputs, not
    frozen into the graph (:func:`_unmark_static_inputs`).
    Returns the compiled module; call it under ``torch.inference_mode()``."""
    if not isinstance(autotune, bool):
        raise TypeError(f"compile_model(autotune={autotune!r}): expected True or False")
    if not can_compile():
        raise RuntimeError("compile_model needs a C++ compiler (g++ or clang++) on PATH for inductor's CPU backend")
    import torch._dynamo.config as dynamo_config

    # every compiled copy of one model class recompiles the same forward; past dynamo's limit (8) the rest would
    # silently run eager, e.g. in a benchmark comparing several quantized copies
    dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, 64)
    for module in model.modules():
        # bitsandbytes' Linear8bitLt moves its int8 codes from the weight into its matmul state on its first
        # forward; done while dynamo traces, that edit changes the state the graph is guarded on, and the second
        # call compiles the whole model again. Done here, it is the same call, made once before tracing.
        if getattr(getattr(module, "weight", None), "CB", None) is not None and hasattr(module, "init_8bit_state"):
            module.init_8bit_state()
    # static shapes: a new input shape (batch 1, then 8) compiles its own fully specialised graph rather than one
    # symbolic-batch graph for all; pass dynamic=None/True to trade that for fewer compilations
    compiled = torch.compile(model, **{"dynamic": False, **compile_kwargs})
    forward = compiled.forward

    def frozen_forward(*args, **kwargs):
        # every call: a new StaticCache (one per generate call) is marked by its eager prefill, after compile_model
        _unmark_static_inputs((args, kwargs))
        with _inference_config(autotune):  # read when the graph compiles (first call, recompiles)
            return forward(*args, **kwargs)

    compiled.forward = frozen_forward
    return compiled
