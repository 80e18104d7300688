"""The training matmul of a 4-bit layer (QLoRA), with the weight dequantized a few rows at a time.

Why: bitsandbytes' ``MatMul4Bit`` dequantizes the whole weight for the forward and again for the input gradient:
one 8192 x 2048 MLP weight of the 1B Llama shape is 32 MB of bf16 (117 MB at 8B, 470 MB at 70B) held at once, on
top of the activations, at exactly the moments a QLoRA step peaks (the recomputed forward and the backward of a
checkpointed block, docs/fsdp.md). Here the same bitsandbytes kernel (``bitsandbytes::dequantize_4bit``) runs on
pieces of whole quantization blocks, so only one piece (:data:`PIECE_ELEMENTS`) is dequantized at a time: a few rows
of the weight for the forward, each piece's matmul writing its columns of the output; a few columns for the input
gradient, each piece's matmul writing its columns of the gradient. The weight stays frozen (no weight gradient, as
in bitsandbytes). The results are bitsandbytes' up to summation order: the same dequantized values, every output
and gradient entry from one matmul over the whole reduction (a smaller matmul may block its sums differently).
Row pieces for the gradient would need its partial sums kept in fp32: 16 MB more, plus as much for the conversion,
at the 512 x 8192 gradient of the 1B shape's down projection, where a sharded QLoRA step peaked (docs/fsdp.md).
"""

from __future__ import annotations

import torch

# Weight elements dequantized at once: 8 MB of bf16. A layer of at most this many weights runs in one piece.
PIECE_ELEMENTS = 1 << 22


def rows_per_piece(rows: int, cols: int, blocksize: int, elements: int) -> int:
    """Rows of a ``rows x cols`` weight per piece of about ``elements``: whole quantization blocks and whole packed
    bytes per piece (two 4-bit codes a byte), or all the rows at once when no smaller count allows it."""
    per_piece = max(1, elements // cols)
    while per_piece < rows and (per_piece * cols) % (2 * blocksize):
        per_piece += 1
    return min(per_piece, rows)


def block_constants(state) -> torch.Tensor:
    """The fp32 absmax of every block, the nested (double) quantization undone: as bitsandbytes' dequantization
    computes it."""
    from bitsandbytes.functional import dequantize_blockwise

    if not state.nested:
        return state.absmax.float()
    return (dequantize_blockwise(state.absmax, state.state2) + state.offset).float()


def portable_dequantize(codes: torch.Tensor, absmax: torch.Tensor, state, dtype: torch.dtype) -> torch.Tensor:
    """The whole weight from its packed ``codes`` (uint8, two a byte, the first in the high nibble) and fp32 block
    constants, blocks running over the flattened weight as bitsandbytes quantizes them: for the rows bitsandbytes'
    CPU kernel gets wrong (see :func:`dequantized_pieces`)."""
    rows, cols = state.shape
    count, size = rows * cols, state.blocksize
    values = torch.stack([codes >> 4, codes & 0xF], dim=-1).reshape(-1)[:count]
    weight = state.code.to(device=codes.device, dtype=torch.float32)[values.long()]
    weight = torch.nn.functional.pad(weight, (0, -count % size)).view(-1, size) * absmax[:, None]
    return weight.reshape(-1)[:count].reshape(rows, cols).to(dtype)


def dequantized_pieces(packed: torch.Tensor, state, dtype: torch.dtype, elements: int = PIECE_ELEMENTS):
    """``(first_row, stop_row, weight rows in dtype)`` for the whole weight, one piece at a time."""
    rows, cols = state.shape
    codes, absmax = packed.reshape(-1).view(torch.uint8), block_constants(state)
    if cols % state.blocksize:
        # A row length that is not a multiple of the block size: blocks straddle rows, so one piece. bitsandbytes'
        # CPU kernel (0.50) misplaces such blocks for even row lengths (mean error 2.3x / 1.9x the portable reading's
        # for nf4 / fp4 on a 256 x 96 Gaussian weight: benchmarks/bnb_cpu_dequant.py), so on CPU the portable
        # reading runs instead.
        if codes.device.type == "cpu":
            yield 0, rows, portable_dequantize(codes, absmax, state, dtype)
        else:
            yield 0, rows, torch.ops.bitsandbytes.dequantize_4bit.default(
                codes, absmax, state.blocksize, state.quant_type, (rows, cols), dtype
            )
        return
    per_piece = rows_per_piece(rows, cols, state.blocksize, elements)
    for start in range(0, rows, per_piece):
        stop = min(start + per_piece, rows)
        first, last = start * cols, stop * cols
        piece = torch.ops.bitsandbytes.dequantize_4bit.default(
            codes[first // 2 : last // 2], absmax[first // state.blocksize : last // state.blocksize],
            state.blocksize, state.quant_type, (stop - start, cols), dtype,
        )  # fmt: skip
        yield start, stop, piece
        del piece  # else it would live on while the next piece is dequantized: two pieces at once


def dequantized_columns(packed: torch.Tensor, state, dtype: torch.dtype, elements: int = PIECE_ELEMENTS):
    """``(first_col, stop_col, weight columns in dtype)`` for the whole weight, one piece at a time: whole
    quantization blocks of every row (a row length that is not a multiple of the block size: one piece, as
    :func:`dequantized_pieces` reads it)."""
    rows, cols = state.shape
    size = state.blocksize
    if cols % size or rows * cols <= elements:
        yield from ((0, cols, weight) for _, _, weight in dequantized_pieces(packed, state, dtype, elements))
        return
    codes = packed.reshape(-1).view(torch.uint8).view(rows, cols // 2)
    absmax = block_constants(state).view(rows, cols // size)
    per_piece = min(cols, max(1, elements // rows // size) * size)  # whole blocks (and bytes: blocks are even)
    for start in range(0, cols, per_piece):
        stop = min(start + per_piece, cols)
        piece = torch.ops.bitsandbytes.dequantize_4bit.default(
            codes[:, start // 2 : stop // 2].contiguous(), absmax[:, start // size : stop // size].contiguous(),
            size, state.quant_type, (rows, stop - start), dtype,
        )  # fmt: skip
        yield start, stop, piece
        del piece  # as in dequantized_pieces


def dequantize(packed: torch.Tensor, state, dtype: torch.dtype) -> torch.Tensor:
    """The whole weight in ``dtype`` (for export and merging), by :func:`dequantized_pieces`."""
    pieces = [piece for _, _, piece in dequantized_pieces(packed, state, dtype)]
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces)  # one piece: no copy of the whole weight


class PiecewiseMatMul4bit(torch.autograd.Function):
    """``linear(inputs, dequantize(packed), bias)`` for a frozen 4-bit weight (see the module docstring)."""

    @staticmethod
    def forward(ctx, inputs: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None, state) -> torch.Tensor:
        rows, cols = state.shape
        flat = inputs.reshape(-1, cols)
        out = inputs.new_empty(len(flat), rows)
        for start, stop, weight in dequantized_pieces(packed, state, inputs.dtype):
            # with the bias in the same call, as functional.linear adds it (one rounding)
            out[:, start:stop] = flat @ weight.t() if bias is None else torch.addmm(bias[start:stop], flat, weight.t())
            del weight  # before the next piece is dequantized
        # the packed weight (held by the module anyway; under FSDP2 gathered again for the backward), not a copy
        ctx.packed, ctx.state, ctx.bias_needs_grad = packed, state, bias is not None and bias.requires_grad
        return out.reshape(*inputs.shape[:-1], rows)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        rows, cols = ctx.state.shape
        flat = grad_output.reshape(-1, rows)
        grad_input = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_input = None
            for start, stop, weight in dequantized_columns(ctx.packed, ctx.state, flat.dtype):
                if start == 0 and stop == cols:  # one piece: bitsandbytes' product as it is
                    grad_input = flat @ weight
                    break
                if grad_input is None:
                    grad_input = flat.new_empty(len(flat), cols)
                grad_input[:, start:stop] = flat @ weight
                del weight  # before the next piece is dequantized
            grad_input = grad_input.reshape(*grad_output.shape[:-1], cols)
        if ctx.bias_needs_grad:
            grad_bias = flat.sum(0)
        return grad_input, None, grad_bias, None
