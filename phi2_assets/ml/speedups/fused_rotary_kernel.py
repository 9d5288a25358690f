"""The Triton kernel behind `fused_rotary.rotate_queries_and_keys` on CUDA (imported only there: Triton needs a GPU).

One program per (batch row, position) rotates every head of the query and the key: out[i] = x[i]·cos[i] −
x[i + R/2]·sin[i] below R/2, x[i]·cos[i] + x[i − R/2]·sin[i] up to R, x[i] after. Each product and the sum are
rounded to the tensors' dtype as PyTorch's eager ops round them, so the result equals theirs bit for bit.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rotate(source, target, batch, position, positions, heads, stride_batch, stride_head, stride_position,
            cos, sin, HEAD_DIM: tl.constexpr, ROTARY: tl.constexpr, BLOCK_HEADS: tl.constexpr, BLOCK_DIM: tl.constexpr):
    head = tl.arange(0, BLOCK_HEADS)[:, None]
    dim = tl.arange(0, BLOCK_DIM)[None, :]
    inside = (head < heads) & (dim < HEAD_DIM)
    rotated = dim < ROTARY
    partner = tl.where(dim < ROTARY // 2, dim + ROTARY // 2, dim - ROTARY // 2)
    row = source + batch * stride_batch + head * stride_head + position * stride_position
    x = tl.load(row + dim, mask=inside, other=0.0)
    x_partner = tl.load(row + partner, mask=inside & rotated, other=0.0)
    dtype = x.dtype
    direct = (x.to(tl.float32) * cos).to(dtype).to(tl.float32)
    crossed = (x_partner.to(tl.float32) * sin).to(dtype).to(tl.float32)
    crossed = tl.where(dim < ROTARY // 2, -crossed, crossed)
    out = tl.where(rotated, (direct + crossed).to(dtype), x)
    # the output is contiguous (batch, heads, positions, head_dim)
    tl.store(target + ((batch * heads + head) * positions + position) * HEAD_DIM + dim, out, mask=inside)


# Triton compiles a variant per integer argument that is 1 or a multiple of 16; the position count is 1 in decoding
# steps and anything in prefill chunks, and each variant costs a compile in a machine's first generation. (The
# strides keep their variants: a multiple of 16 lets loads be vectorised.)
@triton.jit(do_not_specialize=["positions"])
def _rotary_kernel(query, key, query_out, key_out, cos, sin, positions, heads,
                   q_stride_batch, q_stride_head, q_stride_position, k_stride_batch, k_stride_head, k_stride_position,
                   cs_stride_batch, cs_stride_position,
                   HEAD_DIM: tl.constexpr, ROTARY: tl.constexpr, BLOCK_HEADS: tl.constexpr, BLOCK_DIM: tl.constexpr):
    program = tl.program_id(0)
    batch, position = (program // positions).to(tl.int64), program % positions  # 64-bit offsets past 2**31 elements
    dim = tl.arange(0, BLOCK_DIM)[None, :]
    angle = batch * cs_stride_batch + position * cs_stride_position + dim
    rotated = dim < ROTARY
    cos_row = tl.load(cos + angle, mask=rotated, other=1.0).to(tl.float32)
    sin_row = tl.load(sin + angle, mask=rotated, other=0.0).to(tl.float32)
    _rotate(query, query_out, batch, position, positions, heads, q_stride_batch, q_stride_head, q_stride_position,
            cos_row, sin_row, HEAD_DIM, ROTARY, BLOCK_HEADS, BLOCK_DIM)
    _rotate(key, key_out, batch, position, positions, heads, k_stride_batch, k_stride_head, k_stride_position,
            cos_row, sin_row, HEAD_DIM, ROTARY, BLOCK_HEADS, BLOCK_DIM)


def rotate(query: torch.Tensor, key: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
           rotary_dims: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Query and key (batch, heads, positions, head_dim; any strides with a unit last one) rotated into new
    contiguous tensors; `cos` and `sin` are (batch or 1, positions, rotary_dims), the same strides."""
    batch, heads, positions, head_dim = query.shape
    cos, sin = (angle.expand(batch, positions, rotary_dims) for angle in (cos, sin))
    if cos.stride() != sin.stride() or cos.stride(-1) != 1:
        cos, sin = cos.contiguous(), sin.contiguous()
    query_out = torch.empty_like(query, memory_format=torch.contiguous_format)
    key_out = torch.empty_like(key, memory_format=torch.contiguous_format)
    _rotary_kernel[(batch * positions,)](
        query, key, query_out, key_out, cos, sin, positions, heads,
        query.stride(0), query.stride(1), query.stride(2), key.stride(0), key.stride(1), key.stride(2),
        cos.stride(0), cos.stride(1),
        HEAD_DIM=head_dim, ROTARY=rotary_dims, BLOCK_HEADS=triton.next_power_of_2(heads),
        BLOCK_DIM=triton.next_power_of_2(head_dim),
    )
    return query_out, key_out
