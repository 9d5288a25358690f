"""The Triton kernels behind `filled_columns` on CUDA (imported only there: Triton needs a GPU).

One decoding step's attention, one query per row, over a head-major static cache (rows, heads, columns, head dim):
row r attends to columns `starts[r]` to `starts[r] + used[r]`. The columns are cut into splits of equal width; one
program per (row, head, split) reads its keys and values once, in blocks, and keeps a running softmax (its maximum,
its sum, the weighted values) in fp32; a second kernel weighs the splits' partial results into the output. More
programs than (row, head) pairs keep enough loads in flight to run at the memory's speed, whatever the batch. A head
dim that is no power of two (Phi-2's 80) is read as two parts that are (64 + 16), so no load is masked off by
padding the dim.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from phi2_assets.ml.speedups.filled_columns import head_dim_parts

BLOCK_COLUMNS = 64  # keys per block, read by one warp
COLUMNS_PER_SPLIT = 512  # eight blocks a program: loads enough in flight per program to hide their latency


@triton.jit(do_not_specialize=["cache_length", "span"])
def _attend_split(query, keys, values, starts, used, partial_values, partial_max, partial_sum, heads, cache_length,
                  span, scale, HEAD_DIM: tl.constexpr, LOW: tl.constexpr, HIGH: tl.constexpr,
                  BLOCK_N: tl.constexpr):
    row_head, split, splits = tl.program_id(0), tl.program_id(1), tl.num_programs(1)
    row = row_head // heads
    start, filled = tl.load(starts + row), tl.load(used + row)
    first = start + split * span
    last = tl.minimum(first + span, start + filled)
    low = tl.arange(0, LOW)
    high = LOW + tl.arange(0, max(HIGH, 1))  # read only where HIGH > 0
    q_low = tl.load(query + row_head * HEAD_DIM + low).to(tl.float32) * scale
    q_high = tl.load(query + row_head * HEAD_DIM + high, mask=high < HEAD_DIM, other=0.0).to(tl.float32) * scale
    base = row_head.to(tl.int64) * cache_length * HEAD_DIM
    running_max = tl.full([], float("-inf"), tl.float32)
    running_sum = tl.zeros([], tl.float32)
    weighted_low = tl.zeros([LOW], tl.float32)
    weighted_high = tl.zeros([max(HIGH, 1)], tl.float32)
    for block in range(first, last, BLOCK_N):
        columns = block + tl.arange(0, BLOCK_N)
        inside = columns < last
        rows = base + columns[:, None] * HEAD_DIM
        scores = tl.sum(tl.load(keys + rows + low[None, :], mask=inside[:, None], other=0.0).to(tl.float32)
                        * q_low[None, :], axis=1)
        if HIGH > 0:
            scores += tl.sum(tl.load(keys + rows + high[None, :], mask=inside[:, None], other=0.0).to(tl.float32)
                             * q_high[None, :], axis=1)
        scores = tl.where(inside, scores, float("-inf"))
        new_max = tl.maximum(running_max, tl.max(scores, axis=0))
        rescale = tl.exp(running_max - new_max)
        weights = tl.exp(scores - new_max)
        running_sum = running_sum * rescale + tl.sum(weights, axis=0)
        v_low = tl.load(values + rows + low[None, :], mask=inside[:, None], other=0.0).to(tl.float32)
        weighted_low = weighted_low * rescale + tl.sum(weights[:, None] * v_low, axis=0)
        if HIGH > 0:
            v_high = tl.load(values + rows + high[None, :], mask=inside[:, None], other=0.0).to(tl.float32)
            weighted_high = weighted_high * rescale + tl.sum(weights[:, None] * v_high, axis=0)
        running_max = new_max
    slot = row_head * splits + split
    tl.store(partial_values + slot * HEAD_DIM + low, weighted_low)
    tl.store(partial_values + slot * HEAD_DIM + high, weighted_high, mask=high < HEAD_DIM)
    tl.store(partial_max + slot, running_max)
    tl.store(partial_sum + slot, running_sum)


# One compile for every cache of up to MIN_BLOCK_SPLITS splits: Triton would compile a variant per split count that
# is 1 and per power of two above it, each a fraction of a second inside a machine's first generation.
MIN_BLOCK_SPLITS = 4


@triton.jit(do_not_specialize=["splits"])
def _combine_splits(partial_values, partial_max, partial_sum, output, splits, HEAD_DIM: tl.constexpr,
                    BLOCK_DIM: tl.constexpr, BLOCK_SPLITS: tl.constexpr):
    row_head = tl.program_id(0)
    split = tl.arange(0, BLOCK_SPLITS)
    in_split = split < splits
    split_max = tl.load(partial_max + row_head * splits + split, mask=in_split, other=float("-inf"))
    split_sum = tl.load(partial_sum + row_head * splits + split, mask=in_split, other=0.0)
    weight = tl.exp(split_max - tl.max(split_max, axis=0))  # an empty split's maximum is -inf: weight 0
    dim = tl.arange(0, BLOCK_DIM)
    slots = (row_head * splits + split)[:, None] * HEAD_DIM + dim[None, :]
    split_values = tl.load(partial_values + slots, mask=in_split[:, None] & (dim[None, :] < HEAD_DIM), other=0.0)
    out = tl.sum(split_values * weight[:, None], axis=0) / tl.sum(split_sum * weight, axis=0)
    tl.store(output + row_head * HEAD_DIM + dim, out.to(output.dtype.element_ty), mask=dim < HEAD_DIM)


def attend_filled_columns(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, starts: torch.Tensor,
                          used: torch.Tensor, scale: float, columns_per_split: int = COLUMNS_PER_SPLIT) -> torch.Tensor:
    """Attention output (rows, 1, heads, head dim) of one query per row (`query` rows, heads, 1, head dim) over
    `keys` and `values` (rows, heads, columns, head dim, contiguous), row r reading columns
    [`starts[r]`, `starts[r] + used[r]`) (int32, on the device, so a recorded CUDA graph reads their new values).
    The head dim must have `head_dim_parts`."""
    rows, heads, _, head_dim = query.shape
    splits = triton.cdiv(keys.shape[2], columns_per_split)
    partial = attend_splits(query, keys, values, starts, used, scale, splits)
    return combine_splits(*partial, query.new_empty(rows, 1, heads, head_dim))


def attend_splits(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, starts: torch.Tensor,
                  used: torch.Tensor, scale: float, splits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The first kernel of `attend_filled_columns`, with the cache's columns cut into `splits`: per (row, head,
    split), the weighted values (rows x heads x splits, head dim), the maximum score and the sum of weights, fp32."""
    rows, heads, _, head_dim = query.shape
    low, high = head_dim_parts(head_dim)
    cache_length = keys.shape[2]
    span = triton.cdiv(triton.cdiv(cache_length, splits), BLOCK_COLUMNS) * BLOCK_COLUMNS
    partial_values = query.new_empty(rows * heads * splits, head_dim, dtype=torch.float32)
    partial_max = query.new_empty(rows * heads * splits, dtype=torch.float32)
    partial_sum = torch.empty_like(partial_max)
    _attend_split[(rows * heads, splits)](
        query.contiguous(), keys, values, starts, used, partial_values, partial_max, partial_sum, heads, cache_length,
        span, scale, HEAD_DIM=head_dim, LOW=low, HIGH=high, BLOCK_N=BLOCK_COLUMNS, num_warps=1)
    return partial_values, partial_max, partial_sum


def combine_splits(partial_values: torch.Tensor, partial_max: torch.Tensor, partial_sum: torch.Tensor,
                   output: torch.Tensor) -> torch.Tensor:
    """The second kernel of `attend_filled_columns`: `attend_splits`' results weighed together into `output`
    (rows, 1, heads, head dim), which it returns."""
    rows, _, heads, head_dim = output.shape
    splits = partial_max.numel() // (rows * heads)
    _combine_splits[(rows * heads,)](
        partial_values, partial_max, partial_sum, output, splits, HEAD_DIM=head_dim,
        BLOCK_DIM=triton.next_power_of_2(head_dim),
        BLOCK_SPLITS=max(MIN_BLOCK_SPLITS, triton.next_power_of_2(splits)), num_warps=1)
    return output
