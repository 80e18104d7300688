"""Sharding a model with bitsandbytes 4-bit layers over processes (FSDP2, ``torch.distributed.fsdp.fully_shard``).

Why FSDP2 and not FSDP1: FSDP2 shards each parameter on its own (a DTensor per parameter), so the packed 4-bit
weights keep their uint8 storage next to float parameters. FSDP1 flattens every parameter of a unit into one buffer
of one dtype, so the packed bytes must be stored as bf16 (bitsandbytes' ``quant_storage``) — where NaN bit patterns
can be rewritten in transit (bitsandbytes #1945) — and Fabric refuses FSDP1 on CPU. Only uint8 storage is accepted
here, so that failure cannot happen; :func:`packed_digest` compares packed bytes where a check is wanted.

What FSDP2 does not know about bitsandbytes, and is handled here:
- the quantization statistics (absmax, nested statistics, quant map) live in a ``QuantState`` attached to the
  ``Params4bit`` weight; sharding replaces the weight with a plain DTensor parameter and the state survives only on
  the module (``module.quant_state``, from which bitsandbytes restores it in forward). :func:`full_state_dict` and
  the layer's ``_save_to_state_dict`` (fabric_quant.nn.bnb) read it from there, so gathered checkpoints are complete;
- a layer must be quantized before it is sharded (a float weight sharded first can never be quantized again):
  :func:`shard_model` refuses float bitsandbytes layers.
Every function that gathers or scatters is collective: all ranks call it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from fabric_quant.checkpoint import load_tensors, save_tensors
from fabric_quant.hf import embedding_modules, transformer_blocks
from fabric_quant.nn.base import local, quantized_layers, set_whole, whole
from fabric_quant.nn.bnb import Linear4bit


def check_shardable(model: torch.nn.Module) -> None:
    """Every quantized layer must be a 4-bit one, already quantized, with uint8 storage."""
    for name, layer in quantized_layers(model):
        mode = getattr(layer, "fq_mode", type(layer).__name__)
        if not isinstance(layer, Linear4bit):
            raise ValueError(
                f"layer {name!r} ({mode}): only the 4-bit bitsandbytes modes can be sharded (nf4,"
                " nf4-dq, fp4, fp4-dq); int8 layers keep their scales in the parameter FSDP replaces"
            )
        if not layer.is_quantized():
            raise ValueError(f"layer {name!r} is not quantized yet: quantize (e.g. fq.from_pretrained(path, mode))"
                             " before sharding; a sharded float weight cannot be quantized")  # fmt: skip
        if layer.weight.dtype != torch.uint8:
            raise ValueError(
                f"layer {name!r} stores its packed weight as {layer.weight.dtype}; FSDP2 shards uint8"
                " storage as it is (quant_storage=torch.uint8): float storage risks NaN rewriting"
            )


def _shard_block(block: torch.nn.Module, per_layer: bool, **kwargs) -> None:
    """``fully_shard`` a transformer block; with ``per_layer``, each of its 4-bit layers first as a unit of its own
    (the block's unit keeps the rest: norms). Why per layer: a rank then holds one layer gathered (plus the next,
    prefetched) instead of a whole block: at the 1B shape 8 MB instead of 31 MB per unit, which FSDP2 holds up to
    three times over while gathering (send buffer, receive buffer, copied-out parameters) and once more prefetched."""
    from torch.distributed.fsdp import fully_shard

    if per_layer:
        for _, layer in quantized_layers(block):
            fully_shard(layer, **kwargs)
            if kwargs.get("reshard_after_forward", True):
                layer.register_forward_hook(_reshard_after_recompute)
    fully_shard(block, **kwargs)


def _reshard_after_recompute(unit, args, output):
    """Free a unit gathered for the recomputed forward of a checkpointed block (a forward run by the backward pass).
    FSDP2 does not reshard there (its post_forward skips it in the backward), so every layer of the block stayed
    gathered from the recompute to its own backward: at the 1B shape 22 MB more at the down projection's
    recompute, where a sharded QLoRA step peaked (docs/fsdp.md). The unit is gathered again at its backward: one
    more all-gather of each layer per step."""
    from torch.distributed.fsdp._fully_shard._fsdp_common import is_bw  # the test FSDP2's post_forward skips on

    if is_bw():
        unit.reshard()
    return output


def shard_model(model: torch.nn.Module, mesh=None, *, blocks: list[torch.nn.Module] | None = None,
                reshard_after_forward: bool = True, cpu_offload: bool = False,
                per_layer: bool = True) -> torch.nn.Module:  # fmt: skip
    """``fully_shard`` each transformer block (with ``per_layer``, each 4-bit layer in it first), then the root
    (final norm), over ``mesh`` (default: all ranks); the embedding, the output head and trainable parameters added
    after sharding are left out (see below). ``cpu_offload``: parameters, gradients and optimizer state live on the
    CPU between uses (CUDA)."""
    from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, OffloadPolicy, fully_shard

    check_shardable(model)
    policy = CPUOffloadPolicy() if cpu_offload else OffloadPolicy()
    kwargs = {"mesh": mesh, "reshard_after_forward": reshard_after_forward, "offload_policy": policy}
    for block in blocks if blocks is not None else transformer_blocks(model):
        if not isinstance(block, FSDPModule):  # else sharded already, e.g. by the loader (shard_on_load)
            _shard_block(block, per_layer, **kwargs)
    # Left out of the root unit: the input embedding and output head (frozen; vocabulary-parallel when the model
    # was built with fabric_quant.distributed.vocab_parallel, else whole on every rank, as in DDP: FSDP2 would gather a
    # 128K-token table whole for every lookup, twice its size while copying it out), and any other trainable
    # parameter added after sharding: the LoRA adapters (peft adds them after a sharded load, and FSDP cannot add
    # parameters to a unit already built) and a classifier. They are small (LoRA r=8 on every Linear of the 1B
    # shape: 11 MB, about 45 MB with gradients and AdamW state; as FSDP units of their own they measured the same
    # peak within 10 MB and a 1.2x slower step, docs/fsdp.md), and :func:`sync_gradients` averages their
    # gradients at once.
    embedding = {p for m in embedding_modules(model) for p in m.parameters()}
    replicated = {p for p in model.parameters() if p.requires_grad and not isinstance(p, DTensor)}
    fully_shard(model, **kwargs, ignored_params=embedding | replicated)
    return model


def sync_gradients(model: torch.nn.Module) -> None:
    """Average the gradients of the replicated (not sharded) trainable parameters over the ranks, in one
    all-reduce (FSDP reduces the sharded ones itself). Collective; call after the last backward of a step."""
    grads = [p.grad for p in model.parameters() if p.grad is not None and not isinstance(p, DTensor)]
    if not grads or not dist.is_initialized() or dist.get_world_size() == 1:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


def shard_on_load(mesh=None, *, reshard_after_forward: bool = True, cpu_offload: bool = False, per_layer: bool = True):
    """A callback for ``fq.from_pretrained(..., on_block_loaded=...)``: each transformer block is sharded as soon as
    its tensors are loaded, so a rank never holds more than its shards plus one block, even while loading (a 70B
    base packed is 35 GB: more than one 24 GB GPU). ``shard_model`` then shards the root."""
    from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy

    policy = CPUOffloadPolicy() if cpu_offload else OffloadPolicy()

    def shard(block: torch.nn.Module) -> None:
        check_shardable(block)
        _shard_block(block, per_layer, mesh=mesh, reshard_after_forward=reshard_after_forward, offload_policy=policy)

    return shard


@contextmanager
def gathered_root(model: torch.nn.Module) -> Iterator[None]:
    """Keep the root unit's parameters (the final norm) gathered: for calls that use submodules
    directly instead of the root's forward, e.g. transformers' ``generate`` (each block still gathers its own).
    Collective: every rank must make the same calls inside."""
    from torch.distributed.fsdp import FSDPModule

    root = next((m for m in model.modules() if isinstance(m, FSDPModule)), None)
    if root is not None:
        root.unshard()
    try:
        yield
    finally:
        if root is not None:
            root.reshard()


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def iter_full_state(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """The model's state dict (quantization statistics included), each sharded tensor gathered in turn."""
    for key, value in model.state_dict().items():
        yield key, whole(value).detach()


def full_state_dict(model: torch.nn.Module, rank0_only: bool = True) -> dict[str, torch.Tensor]:
    """The unsharded state dict on CPU (on rank 0 only, unless ``rank0_only=False``), one tensor gathered at a
    time so no rank holds more than the result and one tensor in flight."""
    keep = not rank0_only or _rank() == 0
    return {key: value.cpu() for key, value in iter_full_state(model) if keep}


def load_full_state_dict(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load an unsharded state dict (from :func:`full_state_dict` or ``save_quantized``) into a sharded model: every
    rank holds ``state`` and keeps its own shard of each tensor; the 4-bit statistics go to the layers' module
    quant state. The model must already be quantized with the same modes (same packed shapes)."""
    from bitsandbytes.functional import QuantState

    state = dict(state)
    for name, layer in quantized_layers(model):
        key = f"{name}.weight"
        stats = {k[len(key) + 1 :]: state.pop(k) for k in list(state) if k.startswith(key + ".")}
        if not stats:
            raise ValueError(f"{key}: no quantization statistics in the state dict; expected a quantized checkpoint")
        layer.quant_state = QuantState.from_dict(stats, device=local(layer.weight).device)
        if getattr(layer.weight, "quant_state", None) is not None:  # an unsharded Params4bit
            layer.weight.quant_state = layer.quant_state
    saved = set(model.state_dict())  # persistent tensors only (not e.g. rotary tables the model computes)
    own = {
        k: v
        for k, v in [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
        if k in saved
    }  # tied: both names
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise ValueError(f"state dict does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    with torch.no_grad():
        for key, target in own.items():
            if tuple(state[key].shape) != tuple(target.shape):  # a DTensor's shape is the whole one
                raise ValueError(f"{key}: shape {tuple(state[key].shape)} in the state dict, {tuple(target.shape)} in"
                                 " the model")  # fmt: skip
            set_whole(target, state[key])


def packed_digest(model: torch.nn.Module) -> str:
    """SHA-256 over every 4-bit layer's gathered packed bytes and statistics (collective): equal digests, equal
    quantized weights. Compared as bytes, never as floats (a NaN pattern is unequal to itself)."""
    digest = hashlib.sha256()
    for name, layer in quantized_layers(model):
        digest.update(name.encode())
        digest.update(whole(layer.weight).detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
        for key, value in sorted(layer.quant_state.as_dict(packed=True).items()):
            digest.update(key.encode() + value.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def save_sharded(model: torch.nn.Module, folder: str | Path) -> Path:
    """Each rank writes its own shards (``rank-R-of-N.safetensors``, with checksums); rank 0 adds what is not
    sharded (buffers, quantization statistics). Reloaded by :func:`load_sharded` on the same number of ranks."""
    folder = Path(folder)
    rank, world = _rank(), dist.get_world_size() if dist.is_initialized() else 1
    tensors = {}
    for key, value in model.state_dict().items():
        if isinstance(value, DTensor):
            tensors[key] = value.to_local().detach().cpu().contiguous()
        elif rank == 0:
            tensors[key] = value.detach().cpu()
    if rank == 0:
        folder.mkdir(parents=True, exist_ok=True)
    if dist.is_initialized():
        dist.barrier()
    save_tensors(folder / f"rank-{rank:05d}-of-{world:05d}.safetensors", tensors, {"world_size": str(world)})
    if dist.is_initialized():
        dist.barrier()
    return folder


def load_sharded(model: torch.nn.Module, folder: str | Path) -> None:
    """Load :func:`save_sharded` output into a model sharded the same way (same world size, same modes)."""
    from bitsandbytes.functional import QuantState

    folder = Path(folder)
    rank, world = _rank(), dist.get_world_size() if dist.is_initialized() else 1
    files = sorted(folder.glob("rank-*-of-*.safetensors"))
    expected = [folder / f"rank-{r:05d}-of-{world:05d}.safetensors" for r in range(world)]
    if files != expected:
        raise ValueError(f"{folder} holds shards {[f.name for f in files]}; {world} rank(s) need"
                         f" {[f.name for f in expected]}")  # fmt: skip
    mine = load_tensors(expected[rank])
    shared = mine if rank == 0 else load_tensors(expected[0])
    for name, layer in quantized_layers(model):
        key = f"{name}.weight"
        stats = {k[len(key) + 1 :]: v for k, v in shared.items() if k.startswith(key + ".")}
        layer.quant_state = QuantState.from_dict(stats, device=local(layer.weight).device)
    with torch.no_grad():
        saved = set(model.state_dict())
        for key, target in [*model.named_parameters(), *model.named_buffers()]:
            if key not in saved:
                continue
            source = mine[key] if isinstance(target, DTensor) else shared[key]
            if tuple(source.shape) != tuple(local(target).shape):
                raise ValueError(f"{key}: shard shape {tuple(source.shape)} != {tuple(local(target).shape)}")
            local(target).copy_(source)
