"""The Triton kernels behind `lean_lora`'s kernel dropout on CUDA (imported only there: Triton needs a GPU).

An adapter's first matmul with its input's dropout folded in: `down` reads the input once, draws each element's
keep bit from Philox (a counter-based generator: the seed and a counter give the draw), multiplies the kept
elements by 1 / (1 - p) and rounds them to the input's dtype as `nn.Dropout` does, and accumulates their product
with A; it stores the product and the keep bits, one bit per element. The backward pass reads the bits instead of a
mask and a dropped copy: `weight_grad` (A's gradient, summed over row blocks) and `input_grad` (the input's
gradient, rounded after the matmul as PyTorch's ops round it, then dropped and scaled). Rows and columns are those
of the input flattened to (tokens, features); each draw's counter is `(row * features + column) // 4`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_ROWS, BLOCK_COLUMNS = 64, 64
DOWN_BLOCK_ROWS = 32  # the forward's programs each read whole rows: smaller blocks, more programs at 8k rows
ROWS_PER_SPLIT = 1024  # rows one program of the weight gradient sums: enough programs for a large GPU at 8k rows
_BIT_WEIGHTS = (1, 2, 4, 8, 16, 32, 64, 128)


@triton.jit
def _kept(seed, rows, start, FEATURES: tl.constexpr, p, BLOCK_ROWS: tl.constexpr, BLOCK_COLUMNS: tl.constexpr):
    """The keep bits of the block of columns from `start`: one Philox draw gives four uniforms, for four
    neighbouring columns of a row, as PyTorch's dropout kernel uses each draw."""
    groups = start // 4 + tl.arange(0, BLOCK_COLUMNS // 4)
    # 32-bit counters (Philox's cheap form): tokens x features / 4 stays below 2**31
    first, second, third, fourth = tl.rand4x(seed, (rows[:, None] * (FEATURES // 4) + groups[None, :]).to(tl.int32))
    uniform = tl.reshape(tl.join(tl.join(first, second), tl.join(third, fourth)), (BLOCK_ROWS, BLOCK_COLUMNS))
    return uniform >= p


@triton.jit
def _packed(keep, BLOCK_ROWS: tl.constexpr, BLOCK_COLUMNS: tl.constexpr):
    """Each run of 8 keep bits along a row as one byte, lowest column in the lowest bit."""
    bits = tl.reshape(keep.to(tl.int32), (BLOCK_ROWS, BLOCK_COLUMNS // 8, 8))
    weights = tl.reshape(1 << tl.arange(0, 8), (1, 1, 8))
    return tl.sum(bits * weights, axis=2).to(tl.uint8)


@triton.jit
def _unpacked(bits_ptr, rows, columns, inside, FEATURES: tl.constexpr):
    """The keep bits of a block, read from their bytes."""
    packed = tl.load(bits_ptr + rows[:, None] * (FEATURES // 8) + columns[None, :] // 8, mask=inside, other=0)
    return ((packed.to(tl.int32) >> (columns[None, :] % 8)) & 1) != 0


# the token count changes with every batch shape: one compile for all of them
@triton.jit(do_not_specialize=["tokens"])
def _down(x_ptr, a_ptr, out_ptr, bits_ptr, seed_ptr, tokens, p, scale, FEATURES: tl.constexpr, RANK: tl.constexpr,
          BLOCK_ROWS: tl.constexpr, BLOCK_COLUMNS: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    ranks = tl.arange(0, RANK)
    seed = tl.load(seed_ptr)
    total = tl.zeros((BLOCK_ROWS, RANK), tl.float32)
    for start in range(0, FEATURES, BLOCK_COLUMNS):
        columns = start + tl.arange(0, BLOCK_COLUMNS)
        inside = rows[:, None] < tokens
        x = tl.load(x_ptr + rows[:, None] * FEATURES + columns[None, :], mask=inside, other=0.0)
        keep = _kept(seed, rows, start, FEATURES, p, BLOCK_ROWS, BLOCK_COLUMNS)
        dropped = tl.where(keep, x.to(tl.float32) * scale, 0.0).to(x.dtype)
        tl.store(bits_ptr + rows[:, None] * (FEATURES // 8) + (start // 8 + tl.arange(0, BLOCK_COLUMNS // 8))[None, :],
                 _packed(keep, BLOCK_ROWS, BLOCK_COLUMNS), mask=inside)
        a = tl.load(a_ptr + ranks[None, :] * FEATURES + columns[:, None])  # A transposed: (columns, rank)
        total += tl.dot(dropped, a.to(dropped.dtype))
    tl.store(out_ptr + rows[:, None] * RANK + ranks[None, :], total.to(out_ptr.dtype.element_ty),
             mask=rows[:, None] < tokens)


@triton.jit(do_not_specialize=["tokens"])
def _weight_grad(x_ptr, grad_ptr, bits_ptr, out_ptr, tokens, scale, FEATURES: tl.constexpr, RANK: tl.constexpr,
                 BLOCK_ROWS: tl.constexpr, BLOCK_COLUMNS: tl.constexpr, ROWS_PER_SPLIT: tl.constexpr):
    columns = tl.program_id(0) * BLOCK_COLUMNS + tl.arange(0, BLOCK_COLUMNS)
    split = tl.program_id(1).to(tl.int64)
    ranks = tl.arange(0, RANK)
    total = tl.zeros((RANK, BLOCK_COLUMNS), tl.float32)
    for offset in range(0, ROWS_PER_SPLIT, BLOCK_ROWS):
        rows = split * ROWS_PER_SPLIT + offset + tl.arange(0, BLOCK_ROWS)
        inside = rows[:, None] < tokens
        x = tl.load(x_ptr + rows[:, None] * FEATURES + columns[None, :], mask=inside, other=0.0)
        keep = _unpacked(bits_ptr, rows, columns, inside, FEATURES)
        dropped = tl.where(keep, x.to(tl.float32) * scale, 0.0).to(x.dtype)
        grad = tl.load(grad_ptr + rows[:, None] * RANK + ranks[None, :], mask=inside, other=0.0)
        total += tl.dot(tl.trans(grad.to(dropped.dtype)), dropped)
    tl.store(out_ptr + split * RANK * FEATURES + ranks[:, None] * FEATURES + columns[None, :], total)


@triton.jit(do_not_specialize=["tokens"])
def _input_grad(grad_ptr, a_ptr, bits_ptr, out_ptr, tokens, scale, FEATURES: tl.constexpr, RANK: tl.constexpr,
                BLOCK_ROWS: tl.constexpr, BLOCK_COLUMNS: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    columns = tl.program_id(1) * BLOCK_COLUMNS + tl.arange(0, BLOCK_COLUMNS)
    ranks = tl.arange(0, RANK)
    inside = rows[:, None] < tokens
    grad = tl.load(grad_ptr + rows[:, None] * RANK + ranks[None, :], mask=inside, other=0.0)
    a = tl.load(a_ptr + ranks[:, None] * FEATURES + columns[None, :])
    dtype = out_ptr.dtype.element_ty
    dropped_grad = tl.dot(grad.to(dtype), a.to(dtype)).to(dtype)  # rounded as the matmul's output is
    keep = _unpacked(bits_ptr, rows, columns, inside, FEATURES)
    out = tl.where(keep, dropped_grad.to(tl.float32) * scale, 0.0).to(dtype)
    tl.store(out_ptr + rows[:, None] * FEATURES + columns[None, :], out, mask=inside)


def down(x: torch.Tensor, a_weight: torch.Tensor, p: float, seed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(dropout(x) @ A.T, keep bits) for `x` (tokens, features; contiguous), A (rank, features) of x's dtype and a
    one-element int64 `seed` on x's device."""
    tokens, features = x.shape
    rank = a_weight.shape[0]
    out = x.new_empty(tokens, rank)
    bits = torch.empty(tokens, features // 8, dtype=torch.uint8, device=x.device)
    _down[(triton.cdiv(tokens, DOWN_BLOCK_ROWS),)](
        x, a_weight, out, bits, seed, tokens, p, 1.0 / (1.0 - p), FEATURES=features, RANK=rank,
        BLOCK_ROWS=DOWN_BLOCK_ROWS, BLOCK_COLUMNS=BLOCK_COLUMNS)
    return out, bits


def weight_grad(x: torch.Tensor, grad: torch.Tensor, bits: torch.Tensor, p: float) -> torch.Tensor:
    """A's gradient, grad.T @ dropout(x) with the keep bits of `down`, in fp32 (rank, features)."""
    tokens, features = x.shape
    rank = grad.shape[1]
    splits = triton.cdiv(tokens, ROWS_PER_SPLIT)
    partial = torch.empty(splits, rank, features, dtype=torch.float32, device=x.device)
    _weight_grad[(features // BLOCK_COLUMNS, splits)](
        x, grad.contiguous(), bits, partial, tokens, 1.0 / (1.0 - p), FEATURES=features, RANK=rank,
        BLOCK_ROWS=BLOCK_ROWS, BLOCK_COLUMNS=BLOCK_COLUMNS, ROWS_PER_SPLIT=ROWS_PER_SPLIT)
    return partial.sum(0)


def input_grad(grad: torch.Tensor, a_weight: torch.Tensor, bits: torch.Tensor, p: float,
               dtype: torch.dtype) -> torch.Tensor:
    """The input's gradient through A and the dropout: (grad @ A) rounded to `dtype`, dropped and scaled."""
    tokens = grad.shape[0]
    features = a_weight.shape[1]
    out = torch.empty(tokens, features, dtype=dtype, device=grad.device)
    _input_grad[(triton.cdiv(tokens, BLOCK_ROWS), features // BLOCK_COLUMNS)](
        grad.contiguous(), a_weight, bits, out, tokens, 1.0 / (1.0 - p), FEATURES=features, RANK=a_weight.shape[0],
        BLOCK_ROWS=BLOCK_ROWS, BLOCK_COLUMNS=BLOCK_COLUMNS)
    return out


def unpacked_keep(bits: torch.Tensor) -> torch.Tensor:
    """The keep bits of `down` as a bool tensor (tokens, features)."""
    weights = torch.tensor(_BIT_WEIGHTS, dtype=torch.uint8, device=bits.device)
    return (bits[..., None] & weights).ne(0).reshape(bits.shape[0], -1)
