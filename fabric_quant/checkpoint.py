"""Quantized and dequantized checkpoints in safetensors: atomic writes, loads that never unpickle."""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import shutil
import tempfile
import uuid
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save

from fabric_quant.modules import unwrap
from fabric_quant.nn.base import quantized_layers

FORMAT = "fabric_quant/1"
CHECKSUMS = "fq_sha256"  # safetensors metadata key: {tensor name: sha256 of its bytes}
MANIFEST = "checksums.json"  # a folder's {file: sha256 of its bytes}


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` via a temporary file in the same folder and ``os.replace``: readers see
    either the old file or the complete new one, never a partial write."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; outputs honour the user's umask like open() does
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def save_dir_atomically(target: Path, write) -> Path:
    """Write a folder through ``write(tmp_dir)`` then rename it into place: no half-written folder is ever
    visible under ``target``; a previous folder of that name is replaced only once the new one is complete."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    for stale in target.parent.glob(f".{target.name}.*.tmp"):  # left by a write that was killed
        shutil.rmtree(stale, ignore_errors=True)
    tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        write(tmp)
        old = None
        if target.exists():
            old = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.old")
            target.rename(old)
        tmp.rename(target)
        if old is not None:
            shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _tensors(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses tensors that share memory (tied weights): give each key its own copy where needed."""
    out, seen = {}, set()
    for key, value in state_dict.items():
        value = value.detach()
        ptr = value.untyped_storage().data_ptr()
        out[key] = value.clone().contiguous() if ptr in seen else value.contiguous()
        seen.add(ptr)
    return out


def tensor_sha256(tensor: torch.Tensor) -> str:
    data = tensor.detach().reshape(-1).contiguous().view(torch.uint8).cpu().numpy()
    return hashlib.sha256(memoryview(data)).hexdigest()


def save_tensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> Path:
    """A safetensors file written atomically, with the sha256 of every tensor in its metadata."""
    tensors = _tensors(tensors)
    meta = {**(metadata or {}), CHECKSUMS: json.dumps({k: tensor_sha256(v) for k, v in tensors.items()})}
    return atomic_write_bytes(path, save(tensors, metadata=meta))


def read_metadata(path: str | Path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as f:
        return f.metadata() or {}


def load_tensors(path: str | Path, device: str | torch.device = "cpu", require_checksums: bool = True):
    """The tensors of a file written by :func:`save_tensors`, each verified against its checksum; a mismatch
    names the file and the tensor. ``require_checksums=False`` also takes files without checksums."""
    sums = read_metadata(path).get(CHECKSUMS)
    if sums is None and require_checksums:
        raise ValueError(f"{path} carries no tensor checksums ({CHECKSUMS}): not written by fabric_quant")
    tensors = load_file(str(path))
    if sums is not None:
        expected = json.loads(sums)
        if set(expected) != set(tensors):
            raise ValueError(f"{path}: the tensors do not match the checksum list (file corrupt or edited)")
        for key, value in tensors.items():
            if tensor_sha256(value) != expected[key]:
                raise ValueError(f"{path}: tensor {key!r} does not match its checksum: the file is corrupt")
    return {k: v.to(device) for k, v in tensors.items()}


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_manifest(folder: Path) -> None:
    """Record the sha256 of every file below ``folder`` (payload checksums: pickled optimizer states, adapters
    written by peft) in ``folder/checksums.json``."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)
    sums = {str(p.relative_to(folder)): file_sha256(p) for p in files}
    (folder / MANIFEST).write_text(json.dumps(sums, indent=1))


def verify_manifest(folder: Path) -> None:
    """Check every file listed in ``folder/checksums.json``; a missing or changed file is an error naming it."""
    manifest = folder / MANIFEST
    if not manifest.is_file():
        raise ValueError(f"{folder} has no {MANIFEST}: not a complete fabric_quant checkpoint")
    for name, digest in json.loads(manifest.read_text()).items():
        path = folder / name
        if not path.is_file() or file_sha256(path) != digest:
            raise ValueError(f"{path} is missing or does not match its checksum: the checkpoint is corrupt")


def _layer_modes(model: torch.nn.Module) -> dict[str, str]:
    return {name: layer.fq_mode for name, layer in quantized_layers(model)}


def save_quantized(model: torch.nn.Module, path: str | Path, metadata: dict[str, str] | None = None) -> Path:
    """Save the quantized model's state (packed weights and quantization statistics) to a safetensors file."""
    model = unwrap(model)
    meta = {"format": FORMAT, "layer_modes": json.dumps(_layer_modes(model)), **(metadata or {})}
    return save_tensors(path, model.state_dict(), meta)


def load_quantized(model: torch.nn.Module, path: str | Path, strict: bool = True) -> torch.nn.Module:
    """Load a file written by :func:`save_quantized` into a model quantized with the same modes."""
    model = unwrap(model)
    meta = read_metadata(path)
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path} is not a fabric_quant quantized checkpoint (format={meta.get('format')!r})")
    saved, mine = json.loads(meta["layer_modes"]), _layer_modes(model)
    if saved != mine:
        diff = sorted(k for k in saved.keys() | mine.keys() if saved.get(k) != mine.get(k))
        shown = {k: (saved.get(k), mine.get(k)) for k in diff[:5]}
        raise ValueError(f"{path} was saved from other quantization modes; (checkpoint, model) per layer: {shown}")
    tensors = itertools.chain(model.parameters(), model.buffers())
    device = next((t.device for t in tensors if t.device.type != "meta"), torch.device("cpu"))
    model.load_state_dict(load_tensors(path, device), strict=strict)
    return model


def _is_quantized_weight_key(key: str, layers: dict) -> bool:
    """True for a quantized layer's packed weight and its statistics (``weight``, ``weight.absmax``, ``SCB``, the
    tensors its ``storage_keys`` name: ``qweight``, ``scales``...)."""
    parts = key.split(".")
    for i in range(len(parts)):
        layer = layers.get(".".join(parts[:i]))
        if layer is not None and (parts[i] in _WEIGHT_KEYS or parts[i] in layer.storage_keys):
            return True
    return False


_WEIGHT_KEYS = ("weight", "SCB", "weight_format")


def dequantized_state_dict(model: torch.nn.Module, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """A plain ``torch.nn`` state dict: quantized weights dequantized, every float tensor in ``dtype``."""
    model = unwrap(model)
    layers = dict(quantized_layers(model))
    state = {
        key: value.detach().to(dtype) if value.is_floating_point() else value.detach()
        for key, value in model.state_dict().items()
        if not _is_quantized_weight_key(key, layers)
    }
    for name, layer in layers.items():
        state[f"{name}.weight" if name else "weight"] = layer.dequantized_weight().to(dtype)
    return state


def save_dequantized(model: torch.nn.Module, path: str | Path, dtype: torch.dtype = torch.float32) -> Path:
    """Save :func:`dequantized_state_dict` as safetensors, loadable by the original float model."""
    return save_tensors(path, dequantized_state_dict(model, dtype), {"format": "pt"})
