"""Memory per rank of sharded QLoRA (nf4-dq base, FSDP2) for Llama-3.1 8B / 70B / 405B shapes on N GPUs:
arithmetic from the shapes, not a measurement (no such machine here). Its model part is checked against the
measured footprint of the 1B shape in benchmarks/qlora_sharded.py (``model_mb`` per rank).

    python benchmarks/fsdp_memory.py
Writes benchmarks/results/fsdp_memory.{md,csv,png}.

Per rank, as the recipe shards (docs/fsdp.md): packed base blocks / N (4 bits per weight + one 8-bit block constant
per 64 weights + one fp32 per 256 of those: nf4-dq = 4.127 bits); the bf16 embedding and head / N (split by
vocabulary rows, fabric_quant.distributed.vocab_parallel); replicated: LoRA parameters with their gradients and
AdamW's two states; and the working set: two gathered layers (the largest: the one computing and the one
prefetched, packed, each held up to three times while gathering), activations with gradient checkpointing (each
block's bf16 input kept, one block recomputed at a time), and the chunked loss (256 tokens x vocabulary / N in fp32
and bf16). Runtime overheads (CUDA context, allocator slack, communication buffers) are not included: add 1-3 GB
per GPU.
"""

from __future__ import annotations

from pathlib import Path

from jsonargparse import CLI

SHAPES = {  # hidden, layers, heads, kv heads, MLP, vocabulary, tied embeddings (Llama-3.2 1B, Llama-3.1 8B-405B)
    "llama-1b": (2048, 16, 32, 8, 8192, 128256, True),
    "llama-8b": (4096, 32, 32, 8, 14336, 128256, False),
    "llama-70b": (8192, 80, 64, 8, 28672, 128256, False),
    "llama-405b": (16384, 126, 128, 8, 53248, 128256, False),
}
NF4_DQ_BYTES = (4 + 8 / 64 + 32 / (64 * 256)) / 8  # per weight


def per_rank(shape, world: int, lora_r: int, tokens: int, lora_bytes: int = 8) -> dict[str, float]:
    """GB per rank. ``lora_bytes`` per LoRA parameter: bf16 weight + bf16 gradient + two bf16 AdamW states (the
    recipe's bf16-true); fp32 states would be 12."""
    hidden, layers, heads, kv_heads, mlp, vocab, tied = shape
    kv = hidden // heads * kv_heads
    linears = [(hidden, hidden), (hidden, kv), (hidden, kv), (hidden, hidden), (hidden, mlp), (hidden, mlp),
               (mlp, hidden)]  # fmt: skip  (in, out) of q, k, v, o, gate, up, down
    block_weights = sum(i * o for i, o in linears)
    block_lora = sum(lora_r * (i + o) for i, o in linears)
    gb = 1e9
    base = layers * block_weights * NF4_DQ_BYTES / world / gb
    embeddings = (1 if tied else 2) * vocab * hidden * 2 / world / gb  # embedding and head, bf16, vocab-parallel
    lora = layers * block_lora * lora_bytes / gb  # replicated
    gathered = 2 * 3 * max(i * o for i, o in linears) * NF4_DQ_BYTES / gb  # units of one layer
    # checkpointed: each block's input (bf16) kept; one block recomputed: q/k/v/o, MLP (3 x mlp), norms, in bf16
    activations = (layers * tokens * hidden * 2 + tokens * (6 * hidden + 3 * mlp) * 2 * 2) / gb
    loss = 256 * vocab * (4 + 2 + 2) / world / gb  # each rank's vocabulary rows
    row = {"base_gb": base, "embeddings_gb": embeddings, "lora_and_optimizer_gb": lora, "gathered_layers_gb": gathered,
           "activations_gb": activations, "loss_gb": loss}  # fmt: skip
    row["total_gb"] = sum(row.values())
    return row


def main(world_sizes: tuple[int, ...] = (1, 2, 4, 8), lora_r: int = 16, tokens: int = 2048,
         out_dir: Path = Path("benchmarks/results")) -> None:  # fmt: skip
    from fabric_quant.report import bar_panels, write_report

    rows = [{"model": "llama-1b", "gpus": 2, **per_rank(SHAPES["llama-1b"], 2, 8, 512)}]  # the measured CPU run's shape
    for name, shape in list(SHAPES.items())[1:]:
        for world in world_sizes:
            rows.append({"model": name, "gpus": world, **per_rank(shape, world, lora_r, tokens)})
    columns = ("model", "gpus", "base_gb", "embeddings_gb", "lora_and_optimizer_gb", "gathered_layers_gb",
               "activations_gb", "loss_gb", "total_gb")  # fmt: skip
    header = (
        "# Sharded QLoRA memory per rank (arithmetic)\n\n"
        f"Command: `python benchmarks/fsdp_memory.py`. nf4-dq base ({NF4_DQ_BYTES * 8:.3f} bits per weight), bf16"
        f" embedding and head split by vocabulary rows, LoRA r={lora_r} on every linear layer with bf16 AdamW states,"
        f" {tokens} tokens per rank per micro-batch, gradient checkpointing, the recipe's chunked vocabulary-parallel"
        " loss. Computed from the shapes, not measured; runtime overheads (CUDA context, allocator, communication"
        " buffers) excluded. The first row is the"
        " shape and batch of the measured CPU run (LoRA r=8, 2 x 256 tokens), whose base + embeddings + LoRA part is"
        " what `fq.footprint` reports per rank there."
    )
    plot = bar_panels([{**r, "arm": f"{r['model']} x{r['gpus']}"} for r in rows], "arm", ["total_gb", "base_gb"],
                      "Sharded QLoRA: GB per rank")  # fmt: skip
    print(write_report(rows, columns, out_dir, "fsdp_memory", header, plot)["markdown"].read_text())


if __name__ == "__main__":
    CLI(main, as_positional=False)
