"""The Triton kernels behind `lean_lora` on CUDA (imported only there: Triton needs a GPU), each rounding where
PyTorch's ops round (contraction into fused multiply-adds is off, so each product is rounded where PyTorch rounds it):

- `scaled_add`: the layer's output, `result + (lora * scale)` with the scaled fp32 LoRA output rounded to the
  result's dtype before the add and the sum rounded again, in one pass instead of three;
- `scaled_grad`: the LoRA output's gradient, the incoming gradient in fp32 times the scale, in one pass instead of
  two (autograd's cast and multiply);
- `dropout_grad`: the gradient of the adapter input's fp32 copy through dropout, back in the input's dtype,
  `(grad * mask) * scale` rounded once, in one pass instead of two (autograd's dropout backward and cast).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 1024


@triton.jit(do_not_specialize=["numel"])
def _scaled_add(result, lora, out, numel, scale, BLOCK: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = offsets < numel
    base = tl.load(result + offsets, mask=inside).to(tl.float32)
    scaled = (tl.load(lora + offsets, mask=inside) * scale).to(out.dtype.element_ty).to(tl.float32)
    tl.store(out + offsets, (base + scaled).to(out.dtype.element_ty), mask=inside)


@triton.jit(do_not_specialize=["numel"])
def _scaled_grad(grad, out, numel, scale, BLOCK: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = offsets < numel
    tl.store(out + offsets, tl.load(grad + offsets, mask=inside).to(tl.float32) * scale, mask=inside)


@triton.jit(do_not_specialize=["numel"])
def _dropout_grad(grad, mask, out, numel, scale, BLOCK: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = offsets < numel
    kept = tl.load(mask + offsets, mask=inside).to(tl.float32)
    values = tl.load(grad + offsets, mask=inside) * kept * scale
    tl.store(out + offsets, values.to(out.dtype.element_ty), mask=inside)


def scaled_add(result: torch.Tensor, lora: torch.Tensor, scale: float) -> torch.Tensor:
    """`result + (lora * scale).to(result.dtype)` of a contiguous half-precision `result` and a contiguous fp32
    `lora` of its shape."""
    out = torch.empty_like(result)
    _scaled_add[(triton.cdiv(result.numel(), BLOCK),)](result, lora, out, result.numel(), scale, BLOCK=BLOCK,
                                                        enable_fp_fusion=False)
    return out


def scaled_grad(grad: torch.Tensor, scale: float) -> torch.Tensor:
    """`grad.float() * scale`."""
    grad = grad.contiguous()
    out = torch.empty_like(grad, dtype=torch.float32)
    _scaled_grad[(triton.cdiv(grad.numel(), BLOCK),)](grad, out, grad.numel(), scale, BLOCK=BLOCK,
                                                      enable_fp_fusion=False)
    return out


def dropout_grad(grad: torch.Tensor, mask: torch.Tensor, scale: float, dtype: torch.dtype) -> torch.Tensor:
    """`(grad * mask * scale).to(dtype)` of an fp32 `grad` and dropout's bool `mask` of its shape."""
    grad = grad.contiguous()
    out = torch.empty_like(grad, dtype=dtype)
    _dropout_grad[(triton.cdiv(grad.numel(), BLOCK),)](grad, mask.view(torch.uint8), out, grad.numel(), scale,
                                                       BLOCK=BLOCK, enable_fp_fusion=False)
    return out
