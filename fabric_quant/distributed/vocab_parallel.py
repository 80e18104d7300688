"""A frozen input embedding and output head split by vocabulary rows over the data-parallel processes.

Why: under FSDP the 4-bit blocks are split over the ranks, but a Llama-3 vocabulary table (128256 x 2048 in bf16,
525 MB at the 1B shape, 2.1 GB at 8B) is bigger than a 1B model's packed blocks. Sharding it as an FSDP unit does
not help: FSDP2 gathers the whole table for every lookup and holds it twice while copying it out (measured: the
per-rank peak rose above DDP's). Here each rank keeps rows ``[start, start + rows)`` for good, and what travels is
small: the token ids and embeddings of a micro-batch, and for the head a chunk of hidden states and per-token
statistics (Megatron's vocabulary-parallel embedding and cross entropy, over the data-parallel group).

- Lookup: every rank looks up every rank's ids in its rows (zeros elsewhere), one all-reduce sums them: each
  token's row comes from its one owner, added to zeros, so the result is exact.
- Loss (:func:`chunked_cross_entropy`): the chunks of each rank's tokens are broadcast in turn; every rank computes
  the logits of its vocabulary rows, the log-sum-exp is combined from the ranks' partial ones, and the gradient
  with respect to the hidden states (the head is frozen) is summed onto the owner of the tokens with one reduce.
- Logits (``head(hidden)``, e.g. for ``generate``): each rank's hidden states broadcast in turn, every rank's
  columns gathered on their owner.
Every forward is collective: all ranks call it, in the same order, as with any sharded forward. The table is a
``DTensor`` (``Shard(0)``), so gathering checkpoint code (``fsdp.full_state_dict``, ``save_sharded``) handles it.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch.nn import functional

from fabric_quant.nn.base import local


def _rows(vocab: int, rank: int, world: int) -> tuple[int, int]:
    """This rank's first row and number of rows: ``torch.chunk``'s split, the one ``DTensor``'s ``Shard(0)`` uses."""
    size = math.ceil(vocab / world)
    start = min(rank * size, vocab)
    return start, min(size, vocab - start)


class _VocabRows:
    """The part both modules share: the mesh, the group, this rank's row range, the sharded table."""

    def _place(self, vocab: int, mesh) -> int:
        """Set the mesh, group, rank and first row; return this rank's number of rows."""
        self.mesh, self.group = mesh, mesh.get_group()
        self.rank, self.world = dist.get_rank(self.group), dist.get_world_size(self.group)
        self.vocab_start, rows = _rows(vocab, self.rank, self.world)
        return rows

    def _init_rows(self, vocab: int, dim: int, mesh, dtype: torch.dtype, device: torch.device) -> None:
        from torch.distributed.tensor import DTensor, Shard

        rows = self._place(vocab, mesh)
        # not touched until the loader fills it, so it costs no memory before then
        part = torch.empty(rows, dim, dtype=dtype, device=device)
        table = DTensor.from_local(part, mesh, [Shard(0)], run_check=False, shape=(vocab, dim), stride=(dim, 1))
        self.weight = torch.nn.Parameter(table, requires_grad=False)

    def load_rows_(self, value: torch.Tensor) -> None:
        """Copy this rank's rows of the whole table ``value`` (e.g. a memory-mapped checkpoint tensor: only these
        rows are read)."""
        part = local(self.weight)
        if tuple(value.shape) != tuple(self.weight.shape):
            raise ValueError(
                f"vocabulary table of shape {tuple(value.shape)}; the model's is {tuple(self.weight.shape)}"
            )
        with torch.no_grad():
            part.copy_(value[self.vocab_start : self.vocab_start + part.shape[0]])

    def _check_frozen(self) -> None:
        if self.weight.requires_grad:
            raise ValueError("a vocabulary-parallel table is frozen (QLoRA trains adapters only); it has no gradient")


class VocabParallelEmbedding(_VocabRows, torch.nn.Embedding):
    """``nn.Embedding`` whose rows are split over the ranks of ``mesh`` (see the module docstring)."""

    def __init__(self, num_embeddings: int, embedding_dim: int, mesh, *, padding_idx: int | None = None,
                 dtype: torch.dtype = torch.bfloat16, device: torch.device | str = "cpu") -> None:  # fmt: skip
        torch.nn.Module.__init__(self)  # nn.Embedding's own init would allocate the whole table
        self.num_embeddings, self.embedding_dim, self.padding_idx = num_embeddings, embedding_dim, padding_idx
        self.max_norm, self.norm_type, self.scale_grad_by_freq, self.sparse = None, 2.0, False, False
        self._init_rows(num_embeddings, embedding_dim, mesh, dtype, torch.device(device))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        self._check_frozen()
        ids = input_ids.reshape(-1)
        counts = _all_counts(ids.numel(), self.world, self.group, ids.device)
        longest = max(counts)
        padded = functional.pad(ids, (0, longest - ids.numel()))  # id 0 in the padding: looked up, never used
        everyone = [torch.empty_like(padded) for _ in range(self.world)]
        dist.all_gather(everyone, padded, group=self.group)
        rows = torch.stack(everyone) - self.vocab_start
        part = local(self.weight)
        mine = (rows >= 0) & (rows < part.shape[0])
        with torch.no_grad():
            found = functional.embedding(rows.clamp(0, max(part.shape[0] - 1, 0)), part)
            found.masked_fill_(~mine[..., None], 0)
            dist.all_reduce(found, group=self.group)
        return found[self.rank, : ids.numel()].reshape(*input_ids.shape, self.embedding_dim).clone()

    def extra_repr(self) -> str:
        return (
            f"{self.num_embeddings}, {self.embedding_dim}, rows {self.vocab_start}.. on rank {self.rank}/{self.world}"
        )


class VocabParallelHead(_VocabRows, torch.nn.Linear):
    """A bias-free output head whose rows (vocabulary entries) are split over the ranks; ``forward`` returns the
    whole logits (gathered). The training loss never calls it: :func:`chunked_cross_entropy` works on the rows."""

    def __init__(self, in_features: int, out_features: int, mesh, *, weight: torch.nn.Parameter | None = None,
                 dtype: torch.dtype = torch.bfloat16, device: torch.device | str = "cpu") -> None:  # fmt: skip
        torch.nn.Module.__init__(self)
        self.in_features, self.out_features = in_features, out_features
        self.register_parameter("bias", None)
        if weight is None:
            self._init_rows(out_features, in_features, mesh, dtype, torch.device(device))
        else:  # tied to the embedding: the same rows of the same table
            self._place(out_features, mesh)
            self.weight = weight

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        self._check_frozen()
        part, group = local(self.weight), self.group
        size = math.ceil(self.out_features / self.world)
        flat = hidden.reshape(-1, hidden.shape[-1])
        logits = None
        # every rank's hidden states in turn: each rank computes its columns, the owner gathers them
        for owner, count in enumerate(_all_counts(len(flat), self.world, group, flat.device)):
            mine, src = owner == self.rank, dist.get_global_rank(group, owner)
            h = flat.contiguous() if mine else flat.new_empty(count, flat.shape[1])
            dist.broadcast(h, src=src, group=group)
            columns = functional.pad(functional.linear(h, part), (0, size - part.shape[0]))  # equal sizes
            pieces = [torch.empty_like(columns) for _ in range(self.world)] if mine else None
            dist.gather(columns, pieces, dst=src, group=group)
            if mine:
                logits = torch.cat(pieces, dim=-1)[:, : self.out_features]
        return logits.reshape(*hidden.shape[:-1], self.out_features)


def _all_counts(count: int, world: int, group, device) -> list[int]:
    mine = torch.tensor([count], dtype=torch.int64, device=device)
    everyone = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(everyone, mine, group=group)
    return [int(c) for c in everyone]


def chunked_cross_entropy(hidden: torch.Tensor, targets: torch.Tensor, chunk: int, want_grad: bool, *,
                          head: VocabParallelHead) -> tuple[torch.Tensor, torch.Tensor | None]:  # fmt: skip
    """Sum of the cross entropies of this rank's tokens (``hidden`` (n, dim), ``targets`` (n,), none ignored) under
    the vocabulary-parallel ``head``, and if ``want_grad`` the gradient w.r.t. ``hidden``: what
    ``fabric_quant.finetune.loss`` computes with the whole head, up to summation order. Collective."""
    head._check_frozen()
    part, start, group = local(head.weight), head.vocab_start, head.group
    counts = _all_counts(len(targets), head.world, group, hidden.device)
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    grad = torch.empty_like(hidden) if want_grad else None
    for owner, count in enumerate(counts):
        for begin in range(0, count, chunk):
            size = min(chunk, count - begin)
            mine = owner == head.rank
            h = hidden[begin : begin + size] if mine else hidden.new_empty(size, hidden.shape[1])
            y = targets[begin : begin + size] if mine else targets.new_empty(size)
            dist.broadcast(h, src=dist.get_global_rank(group, owner), group=group)
            dist.broadcast(y, src=dist.get_global_rank(group, owner), group=group)
            logits = functional.linear(pad_rows(h), part).float()  # bf16 matmul, fp32 softmax: as unsharded
            rows = y - start
            here = (rows >= 0) & (rows < part.shape[0])
            picked = logits[:size].gather(1, rows.clamp(0, max(part.shape[0] - 1, 0))[:, None]).squeeze(1)
            stats = torch.stack([torch.logsumexp(logits[:size], dim=-1), torch.where(here, picked, 0.0)])
            everyone = [torch.empty_like(stats) for _ in range(head.world)]
            dist.all_gather(everyone, stats, group=group)
            everyone = torch.stack(everyone)
            lse = torch.logsumexp(everyone[:, 0], dim=0)
            if mine:
                total += (lse - everyone[:, 1].sum(0)).sum()
            if want_grad:
                probs = softmax_minus_one_hot_(logits, lse, here.nonzero().squeeze(1), rows[here], size)
                partial = (probs.to(part.dtype) @ part)[:size].float()  # summed in fp32 over the ranks
                dist.reduce(partial, dst=dist.get_global_rank(group, owner), group=group)
                if mine:
                    grad[begin : begin + size] = partial.to(grad.dtype)
    return total, grad


# Row counts of the head's matmuls are rounded up to this: every new matmul shape leaves memory behind on CPU
# (oneDNN's per-shape allocations and the freed memory glibc keeps around them); the number of loss tokens differs in
# every batch, so without it a QLoRA run grew by tens of MB per step for its first steps (docs/fsdp.md).
ROW_MULTIPLE = 64


def pad_rows(h: torch.Tensor) -> torch.Tensor:
    """``h`` (rows, dim) with zero rows appended up to a multiple of :data:`ROW_MULTIPLE`."""
    return functional.pad(h, (0, 0, 0, -len(h) % ROW_MULTIPLE))


def softmax_minus_one_hot_(logits, lse, rows, columns, size: int) -> torch.Tensor:
    """In place: ``softmax(logits) - one_hot`` over the first ``size`` rows of ``logits`` (``lse``: their
    log-sum-exps, or those of every row; the one-hot entries at ``rows``, ``columns``), the padding rows after them
    (see :func:`pad_rows`) zeroed."""
    probs = logits.sub_(functional.pad(lse, (0, len(logits) - len(lse)))[:, None]).exp_()
    probs[rows, columns] -= 1.0
    probs[size:] = 0
    return probs


def vocab_parallel_(model: torch.nn.Module, mesh=None) -> torch.nn.Module:
    """Replace the input embedding and the output head of a transformers causal LM (built on the meta device,
    before its weights load) with vocabulary-parallel ones over ``mesh`` (default: every rank, 1-D). A tied head
    shares the embedding's rows. The loader (``fq.from_pretrained``) fills this rank's rows only."""
    from torch.distributed.device_mesh import init_device_mesh

    if mesh is None:
        if not dist.is_initialized():
            raise RuntimeError("vocab_parallel_ splits the vocabulary over the ranks of torch.distributed:"
                               " initialise it first (Fabric's strategy, torchrun + init_process_group)")  # fmt: skip
        device = "cuda" if torch.cuda.is_available() else "cpu"
        mesh = init_device_mesh(device, (dist.get_world_size(),))
    if mesh.ndim != 1:
        raise ValueError(f"vocab_parallel_ takes a 1-D mesh (the data-parallel ranks); got {mesh.ndim} dimensions")
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    if embed.max_norm is not None or embed.scale_grad_by_freq or embed.sparse:
        raise ValueError("vocab_parallel_: embeddings with max_norm, scale_grad_by_freq or sparse gradients are not"
                         " supported")  # fmt: skip
    tied = head is not None and head.weight is embed.weight
    device = torch.device(mesh.device_type, torch.cuda.current_device()) if mesh.device_type == "cuda" else "cpu"
    new_embed = VocabParallelEmbedding(embed.num_embeddings, embed.embedding_dim, mesh, padding_idx=embed.padding_idx,
                                       dtype=embed.weight.dtype, device=device)  # fmt: skip
    new_embed.weight.requires_grad_(False)
    model.set_input_embeddings(new_embed)
    if head is not None:
        if head.bias is not None:
            raise ValueError("vocab_parallel_: an output head with a bias is not supported")
        new_head = VocabParallelHead(head.in_features, head.out_features, mesh, dtype=head.weight.dtype, device=device,
                                     weight=new_embed.weight if tied else None)  # fmt: skip
        new_head.weight.requires_grad_(False)
        model.set_output_embeddings(new_head)
    return model
