"""Resumable checkpoints of a LoRA run: adapters (PEFT format), exact trainable tensors, optimizer, scheduler,
RNG of every rank, the step, the run's fingerprint and progress. Written to a temporary folder and renamed into
place, with a checksum of every file; loaded without unpickling code (safetensors and
``torch.load(weights_only=True)``) after the checksums and the fingerprint are checked."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from fabric_quant.checkpoint import (
    MANIFEST,
    atomic_write_bytes,
    load_tensors,
    read_metadata,
    save_dir_atomically,
    save_tensors,
    verify_manifest,
    write_manifest,
)
from fabric_quant.nn.base import set_whole, whole

LATEST = "latest.json"
RUN = "run.json"


@dataclass
class Progress:
    """What a run has done so far, in one place: the loop advances it, each checkpoint saves it (``run.json``'s
    ``progress``, with the step in the training state) and a resumed run restores it, so the counters, the losses
    and the throughput go on as if the run had never stopped."""

    step: int = 0
    examples: int = 0
    tokens: int = 0
    train_time: float = 0.0
    first_loss: float | None = None
    last_loss: float | None = None
    initial_eval: dict[str, float] | None = None

    def record_step(self, loss: float, seconds: float) -> None:
        """One optimizer step done, with its (all-reduced) loss and wall time."""
        self.step += 1
        self.train_time += seconds
        self.last_loss = loss
        self.first_loss = loss if self.first_loss is None else self.first_loss

    def to_json(self) -> dict:
        """The checkpoint's ``progress`` (the step is saved with the optimizer state, which it must match)."""
        return {"last_loss": self.last_loss, "first_loss": self.first_loss, "initial_eval": self.initial_eval,
                "examples": self.examples, "tokens": self.tokens, "train_time": self.train_time}  # fmt: skip

    @classmethod
    def from_json(cls, saved: dict, step: int = 0) -> Progress:
        return cls(step=step, **{k: saved[k] for k in ("examples", "tokens", "train_time", "first_loss", "last_loss",
                                                       "initial_eval") if k in saved})  # fmt: skip


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The trained tensors, whole: sharded (FSDP) ones are gathered, so every rank must call it."""
    return {name: whole(p).detach().contiguous() for name, p in model.named_parameters() if p.requires_grad}


def is_sharded(model: torch.nn.Module) -> bool:
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def _sharded_trainable(model: torch.nn.Module) -> bool:
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters() if p.requires_grad)


def optimizer_state(model: torch.nn.Module, optimizer) -> dict:
    """The optimizer's state dict; with sharded trainable parameters the whole state keyed by parameter name
    (collective). Adapters replicated beside a sharded base (``fabric_quant.distributed.fsdp``) keep the plain
    format."""
    if not _sharded_trainable(model):
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_optimizer_state_dict(model, getattr(optimizer, "optimizer", optimizer), options=options)


def load_optimizer_state(model: torch.nn.Module, optimizer, state: dict) -> None:
    if not _sharded_trainable(model):
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, getattr(optimizer, "optimizer", optimizer), state,
                             options=StateDictOptions(full_state_dict=True))  # fmt: skip


def save_adapter(peft_model, folder: Path, trainable: dict[str, torch.Tensor] | None = None) -> None:
    """The adapter in PEFT format, its tensors' checksums added to the safetensors metadata (peft ignores them).
    ``trainable``: the gathered tensors of a sharded model (from :func:`trainable_state`)."""
    peft_model.save_pretrained(folder, safe_serialization=True, state_dict=trainable)
    for path in folder.glob("*.safetensors"):
        save_tensors(path, load_tensors(path, require_checksums=False), read_metadata(path))


def save_checkpoint(fabric, ckpt_root: Path, step: int, peft_model, optimizer, scheduler, run: dict) -> Path | None:
    """Collective call (every rank gathers its RNG state); rank 0 writes ``ckpt_root/step-NNNNNN``. ``run`` holds
    the run's fingerprint and progress (JSON), checked and restored on resume."""
    rng = fabric.all_gather(torch.get_rng_state()).reshape(fabric.world_size, -1).cpu()
    trainable, optim = trainable_state(peft_model), optimizer_state(peft_model, optimizer)  # collective if sharded
    target = ckpt_root / f"step-{step:06d}"
    if fabric.global_rank == 0:

        def write(tmp: Path) -> None:
            save_adapter(peft_model, tmp / "adapter", trainable)
            save_tensors(tmp / "trainable.safetensors", trainable)
            state = {"step": step, "optimizer": optim, "scheduler": scheduler.state_dict(), "rng": rng}
            torch.save(state, tmp / "training_state.pt")
            (tmp / RUN).write_text(json.dumps(run, indent=1, allow_nan=False))
            write_manifest(tmp)

        save_dir_atomically(target, write)
        atomic_write_bytes(ckpt_root / LATEST, json.dumps({"step": step, "path": target.name}).encode())
    fabric.barrier()
    return target


def _complete(folder: Path) -> bool:
    return folder.is_dir() and (folder / MANIFEST).is_file() and (folder / "training_state.pt").is_file()


def find_checkpoint(out_dir: Path, resume: bool | str | Path) -> Path | None:
    """``resume=False``: none. ``"auto"``: the latest one if any. ``True``: the latest one, which must exist.
    A path: that checkpoint folder. Without ``latest.json`` the newest complete ``step-*`` folder counts."""
    if resume is False:
        return None
    if isinstance(resume, Path) or (isinstance(resume, str) and resume != "auto"):
        path = Path(resume)
        if not (path / "training_state.pt").is_file():
            raise FileNotFoundError(f"resume={str(resume)!r} is not a checkpoint folder (no training_state.pt)")
        return path
    root = out_dir / "checkpoints"
    pointer = root / LATEST
    if pointer.is_file():
        return root / json.loads(pointer.read_text())["path"]
    complete = sorted(p for p in root.glob("step-*") if _complete(p)) if root.is_dir() else []
    if complete:
        return complete[-1]
    if resume is True:
        raise FileNotFoundError(f"resume=True but {root} holds no complete checkpoint; use resume='auto' instead")
    return None


def read_run(path: Path) -> dict:
    """The fingerprint and progress saved with a checkpoint (after its checksums are verified)."""
    verify_manifest(path)
    return json.loads((path / RUN).read_text())


def check_fingerprint(saved: dict, current: dict, path: Path) -> None:
    """Resuming continues the same run: every key that changes the model, the data or the optimization must match."""
    keys = sorted(saved.keys() | current.keys())
    diff = [f"{k}: checkpoint {saved.get(k)!r}, now {current.get(k)!r}" for k in keys if saved.get(k) != current.get(k)]
    if diff:
        raise ValueError(
            f"{path} belongs to a different run; resuming would silently mix them. Differences:\n  "
            + "\n  ".join(diff)
            + "\nRun with the checkpoint's settings, or start a new run in another --out_dir."
        )


def load_checkpoint(fabric, path: Path, peft_model, optimizer, scheduler) -> int:
    """Restore everything :func:`save_checkpoint` wrote; returns the step to continue from."""
    verify_manifest(path)
    tensors = load_tensors(path / "trainable.safetensors", fabric.device)
    params = dict(peft_model.named_parameters())
    expected = {name: p.shape for name, p in params.items() if p.requires_grad}  # a DTensor's shape is the whole one
    missing = sorted(set(expected) - set(tensors))
    if missing:
        raise ValueError(f"{path} does not match this model: no saved values for {missing[:3]}")
    wrong = [f"{k}: saved {tuple(v.shape)}, model {tuple(expected[k])}" for k, v in tensors.items()
             if k in expected and v.shape != expected[k]]  # fmt: skip (copy_ would broadcast)
    if wrong or set(tensors) - set(expected):
        raise ValueError(f"{path} does not match this model: {wrong[:3] or sorted(set(tensors) - set(expected))[:3]}")
    with torch.no_grad():
        for name, value in tensors.items():
            set_whole(params[name], value)
    state = torch.load(path / "training_state.pt", map_location=fabric.device, weights_only=True)
    load_optimizer_state(peft_model, optimizer, state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    rng = state["rng"]
    if rng.shape[0] != fabric.world_size:
        raise ValueError(f"{path} was written by {rng.shape[0]} processes; this run has {fabric.world_size}")
    torch.set_rng_state(rng[fabric.global_rank].to(torch.uint8).cpu().clone())  # a row view: its offset is ignored
    return int(state["step"])
