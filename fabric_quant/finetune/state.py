"""Resumable checkpoints of a LoRA run: adapters (PEFT format), exact trainable tensors, optimizer, scheduler,
RNG of every rank and the step. Written to a temporary folder and renamed into place; loaded without
unpickling code (safetensors and ``torch.load(weights_only=True)``)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from fabric_quant.checkpoint import atomic_write_bytes, save_dir_atomically

LATEST = "latest.json"


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().contiguous() for name, p in model.named_parameters() if p.requires_grad}


def save_checkpoint(fabric, ckpt_root: Path, step: int, peft_model, optimizer, scheduler) -> Path | None:
    """Collective call (every rank gathers its RNG state); rank 0 writes ``ckpt_root/step-NNNNNN``."""
    rng = fabric.all_gather(torch.get_rng_state()).reshape(fabric.world_size, -1).cpu()
    target = ckpt_root / f"step-{step:06d}"
    if fabric.global_rank == 0:

        def write(tmp: Path) -> None:
            peft_model.save_pretrained(tmp / "adapter", safe_serialization=True)
            save_file(trainable_state(peft_model), tmp / "trainable.safetensors")
            state = {"step": step, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": rng}
            torch.save(state, tmp / "training_state.pt")

        save_dir_atomically(target, write)
        atomic_write_bytes(ckpt_root / LATEST, json.dumps({"step": step, "path": target.name}).encode())
    fabric.barrier()
    return target


def find_checkpoint(out_dir: Path, resume: bool | str | Path) -> Path | None:
    """``resume=False``: none. ``"auto"``: the latest one if any. ``True``: the latest one, which must exist.
    A path: that checkpoint folder."""
    if resume is False:
        return None
    if isinstance(resume, Path) or (isinstance(resume, str) and resume != "auto"):
        path = Path(resume)
        if not (path / "training_state.pt").is_file():
            raise FileNotFoundError(f"resume={str(resume)!r} is not a checkpoint folder (no training_state.pt)")
        return path
    pointer = out_dir / "checkpoints" / LATEST
    if pointer.is_file():
        return out_dir / "checkpoints" / json.loads(pointer.read_text())["path"]
    if resume is True:
        raise FileNotFoundError(f"resume=True but {pointer} does not exist; use resume='auto' to start fresh")
    return None


def load_checkpoint(fabric, path: Path, peft_model, optimizer, scheduler) -> int:
    """Restore everything :func:`save_checkpoint` wrote; returns the step to continue from."""
    tensors = load_file(path / "trainable.safetensors", device=str(fabric.device))
    params = dict(peft_model.named_parameters())
    missing = sorted(set(trainable_state(peft_model)) - set(tensors))
    if missing:
        raise ValueError(f"{path} does not match this model: no saved values for {missing[:3]}")
    with torch.no_grad():
        for name, value in tensors.items():
            params[name].copy_(value)
    state = torch.load(path / "training_state.pt", map_location=fabric.device, weights_only=True)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    rng = state["rng"]
    if rng.shape[0] != fabric.world_size:
        raise ValueError(f"{path} was written by {rng.shape[0]} processes; this run has {fabric.world_size}")
    torch.set_rng_state(rng[fabric.global_rank].to(torch.uint8).cpu())
    return int(state["step"])
