"""The Triton kernel behind `static_decoding`'s prefill writes on CUDA (imported only there: Triton needs a GPU).

A prefill chunk holds its prompts left-aligned (rows, heads, positions, head dim), padded on the right; the batch's
static cache holds them right-aligned. One program per (row, head, block of cache columns) copies each column from
the chunk position it takes, `column - (width - length)`, or position 0 for the columns before the prompt (padding,
never attended): the values `torch.gather` writes with that index, read and written once at the memory's speed
instead of through an index tensor as large as the keys.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_COLUMNS = 32


@triton.jit(do_not_specialize=["width", "first_column"])
def _right_align(source, target, lengths, width, first_column, source_row, source_head, source_position,
                 target_row, target_head, target_column, HEAD_DIM: tl.constexpr, BLOCK_DIM: tl.constexpr,
                 BLOCK_COLUMNS: tl.constexpr):
    row, head, block = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64), tl.program_id(2)
    columns = block * BLOCK_COLUMNS + tl.arange(0, BLOCK_COLUMNS)
    positions = tl.maximum(columns - (width - tl.load(lengths + row)), 0)
    dims = tl.arange(0, BLOCK_DIM)[None, :]
    inside = (columns[:, None] < width) & (dims < HEAD_DIM)
    values = tl.load(source + row * source_row + head * source_head + positions[:, None].to(tl.int64)
                     * source_position + dims, mask=inside)
    tl.store(target + row * target_row + head * target_head + (first_column + columns[:, None]).to(tl.int64)
             * target_column + dims, values, mask=inside)


def right_align(source: torch.Tensor, target: torch.Tensor, lengths: torch.Tensor, first_column: int) -> None:
    """Writes `source` (rows, heads, width, head dim; unit last stride), whose row r holds a prompt of `lengths[r]`
    tokens from position 0, into `target` (rows, heads, columns, head dim; unit last stride) at columns
    `first_column` to `first_column + width`, each prompt ending at the last of them."""
    rows, heads, width, head_dim = source.shape
    _right_align[(rows, heads, triton.cdiv(width, BLOCK_COLUMNS))](
        source, target, lengths, width, first_column, source.stride(0), source.stride(1), source.stride(2),
        target.stride(0), target.stride(1), target.stride(2), HEAD_DIM=head_dim,
        BLOCK_DIM=triton.next_power_of_2(head_dim), BLOCK_COLUMNS=BLOCK_COLUMNS)
