"""bitsandbytes' NF4 linear layer in plain torch operations, for `torch.compile` to trace into its graph.

In a compiled QLoRA step each of bitsandbytes' 4-bit projections is still a call into its Python-registered kernels
(nested absmax, dequantize, linear: on an H200 ~170 us of host time per call, 384 calls a step, while the GPU waited).
Written as torch ops, the dequantization becomes one Inductor kernel inside the compiled layer and the weight's
4-bit storage stays as it is: the same bits in, the same bf16 weight out (`dequantize_nf4` equals bitsandbytes'
`dequantize_4bit`), so training computes what it computed before.
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Iterator

import torch
import torch.utils.checkpoint

_TRACEABLE_BUFFERS = ("nf4_packed", "nf4_absmax", "nf4_code")


def dequantize_nf4(packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
    """The weight bitsandbytes packed two 4-bit codes a byte (first value in the high half), one fp32 absmax per block."""
    packed = packed.reshape(-1)
    codes = torch.stack((packed >> 4, packed & 15), dim=-1).reshape(-1).long()
    blocks = code[codes].view(absmax.numel(), -1) * absmax.view(-1, 1)
    return blocks.to(dtype).view(shape)


def block_absmax(quant_state) -> torch.Tensor:
    """The per-block fp32 scales; a double-quantized state keeps them in 8 bits, decoded here once, exactly as
    bitsandbytes decodes them on every call."""
    import bitsandbytes.functional as bnb_functional

    if not quant_state.nested:
        return quant_state.absmax.float()
    absmax = bnb_functional.dequantize_blockwise(quant_state.absmax, quant_state.state2)
    absmax += quant_state.offset
    return absmax.float()


def _traceable_forward(self, x: torch.Tensor) -> torch.Tensor:
    """`bnb.nn.Linear4bit.forward` for a quantized layer whose compute dtype is set, without bitsandbytes' kernels."""
    # marked for recomputation: the compiled backward decodes the weight again, as bitsandbytes does, instead of
    # keeping every layer's bf16 weight from forward to backward (5 GB for Phi-2, the memory QLoRA exists to save)
    weight = torch.utils.checkpoint.checkpoint(
        dequantize_nf4, self.nf4_packed, self.nf4_absmax, self.nf4_code, (self.out_features, self.in_features), self.compute_dtype,
        use_reentrant=False,
    )
    bias = None if self.bias is None else self.bias.to(self.compute_dtype)
    return torch.nn.functional.linear(x.to(self.compute_dtype), weight, bias).to(x.dtype)


@contextlib.contextmanager
def traceable_4bit_linears(model: torch.nn.Module) -> Iterator[int]:
    """While inside, every bitsandbytes NF4 `Linear4bit` of `model` computes through `dequantize_nf4`; yields how
    many. The packed weights (as plain tensors on the same storage) and the decoded scales are registered as
    buffers, so one compiled graph serves every layer that holds such projections (~4 bytes of scales per 64 weights: 165 MB for Phi-2, against 41 MB double-quantized)."""
    from bitsandbytes.nn import Linear4bit

    linears = [
        module for module in model.modules()
        if isinstance(module, Linear4bit) and module.weight.quant_state is not None and module.weight.quant_state.quant_type == "nf4"
    ]
    for module in linears:
        if getattr(module.weight.quant_state, "packing_format_for_cpu", False):
            raise ValueError("bitsandbytes repacked this model's weights for CPU inference: load it again to train it")
        if module.compute_dtype is None:
            raise ValueError(f"{type(module).__name__} has no compute dtype: load the model with bnb_4bit_compute_dtype")
        module.register_buffer("nf4_packed", module.weight.data, persistent=False)  # a plain tensor on the same storage
        module.register_buffer("nf4_absmax", block_absmax(module.weight.quant_state), persistent=False)
        module.register_buffer("nf4_code", module.weight.quant_state.code, persistent=False)
        module.forward = types.MethodType(_traceable_forward, module)
    try:
        yield len(linears)
    finally:
        for module in linears:
            del module.forward
            for name in _TRACEABLE_BUFFERS:
                delattr(module, name)
