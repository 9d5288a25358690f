"""Lean LoRA: each PEFT LoRA layer's forward as the few tensor ops it computes, without PEFT's per-call Python.

What: PEFT's LoRA `Linear` forward checks its arguments, pops keyword groups, walks the active adapters, looks up
four module dicts and calls `lora_A` and `lora_B` as modules; its 4-bit variant also copies the base layer's output
(a defensive `clone`, a full read and write of every projection's output). A QLoRA step of Phi-2 runs 192 of these
forwards. `LeanLoraLinear` and `LeanLoraLinear4bit` compute the same ops in the same order and dtypes (the base
layer, the input cast to the adapter's dtype, dropout, A, B, the scale, the add), so outputs and gradients are
PEFT's bit for bit; the copy is left out because nothing writes into the base output in place.
On CUDA the 4-bit layer's last three ops (the fp32 LoRA output times the scale, cast to bf16, added to the base
output) run as one kernel, their backward (the gradient cast to fp32 and scaled) as another, and the backward of
the adapter input's fp32 copy and dropout as a third (`lora_kernels`), each rounding where PyTorch's ops round and
dropout drawing its masks as `nn.Dropout` does: with fp32 adapters those ops read and write several bytes per
element of every projection's input and output, forward and backward.
When it pays: training on a GPU, where Python around the step and the adapters' fp32 passes over every projection
output set the pace; on CPU it is neutral.
Knob: `speedups` of the training stage. It applies to layers with one vanilla LoRA adapter (no DoRA or other
variant, no LoRA bias), falls back to PEFT's forward for merged or disabled adapters and for per-call adapter
names, and runs only on the verified PEFT release; the layers get their own class back afterwards.
"""

from __future__ import annotations

import contextlib
import importlib.util
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from peft.tuners.lora import Linear as LoraLinear

from phi2_assets.ml.speedups import guards

_HAS_TRITON = importlib.util.find_spec("triton") is not None  # CUDA builds of PyTorch on Linux ship it
_HALF_PRECISION = (torch.bfloat16, torch.float16)

try:  # PEFT defines its 4-bit LoRA layer only where bitsandbytes is installed
    from peft.tuners.lora.bnb import Linear4bit as LoraLinear4bit
except ImportError:
    LoraLinear4bit = None


def available() -> bool:
    return guards.requires("lean_lora", peft=guards.PEFT)


def _adapter(layer) -> tuple[torch.Tensor, torch.Tensor, torch.nn.Module, float] | None:
    """(A weight, B weight, dropout, scale) of the layer's one active adapter, or None where PEFT's own forward is
    needed (merged, disabled, several adapters)."""
    if layer.merged or layer.disable_adapters or len(layer.active_adapters) != 1:
        return None
    name = layer.active_adapters[0]
    return layer.lora_A[name].weight, layer.lora_B[name].weight, layer.lora_dropout[name], layer.scaling[name]


class LeanLoraLinear(LoraLinear):
    """PEFT's LoRA `Linear` forward for one vanilla adapter: base + (B(A(dropout(x))) * scale), promoted, then cast
    back to the base output's dtype, as PEFT does."""

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        adapter = None if args or kwargs else _adapter(self)
        if adapter is None:
            return super().forward(x, *args, **kwargs)
        a_weight, b_weight, dropout, scale = adapter
        result = self.base_layer(x)
        adapter_input = x if x.dtype == a_weight.dtype else x.to(a_weight.dtype)
        return (result + F.linear(F.linear(dropout(adapter_input), a_weight), b_weight) * scale).to(result.dtype)


if LoraLinear4bit is not None:

    class LeanLoraLinear4bit(LoraLinear4bit):
        """PEFT's 4-bit LoRA forward for one vanilla adapter: the adapter's output cast to the base output's dtype
        before the add, as PEFT does (outside autocast), without its copy of the base output."""

        def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
            adapter = None if args or kwargs or torch.is_autocast_enabled() else _adapter(self)
            if adapter is None:
                return super().forward(x, *args, **kwargs)
            a_weight, b_weight, dropout, scale = adapter
            result = self.base_layer(x)
            if _dropout_fits(x, a_weight, dropout):
                dropped = _CastDropout.apply(x, dropout.p)
            else:
                dropped = dropout(x if x.dtype == a_weight.dtype else x.to(a_weight.dtype))
            output = F.linear(F.linear(dropped, a_weight), b_weight)
            if _epilogue_fits(result, output):
                return _ScaledAdd.apply(result, output, scale)
            return result + (output * scale).to(result.dtype)


def _epilogue_fits(result: torch.Tensor, output: torch.Tensor) -> bool:
    """Whether the epilogue kernel computes `result + (output * scale).to(result.dtype)` for these tensors."""
    return (_HAS_TRITON and result.is_cuda and result.dtype in _HALF_PRECISION and output.dtype == torch.float32
            and result.shape == output.shape and result.is_contiguous() and output.is_contiguous())


def _dropout_fits(x: torch.Tensor, a_weight: torch.Tensor, dropout: torch.nn.Module) -> bool:
    """Whether `_CastDropout` computes `dropout(x.to(a_weight.dtype))`: a training-mode dropout of a half-precision
    CUDA input for fp32 adapters."""
    return (_HAS_TRITON and x.is_cuda and x.dtype in _HALF_PRECISION and a_weight.dtype == torch.float32
            and type(dropout) is torch.nn.Dropout and dropout.training and 0 < dropout.p < 1
            and torch.is_grad_enabled())


class _CastDropout(torch.autograd.Function):
    """`dropout(x.to(torch.float32))`, the mask drawn by the op `nn.Dropout` runs on CUDA; backward in one kernel."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, p: float) -> torch.Tensor:
        dropped, mask = torch.native_dropout(x.to(torch.float32), p, True)
        ctx.save_for_backward(mask)
        ctx.scale, ctx.dtype = 1.0 / (1.0 - p), x.dtype
        return dropped

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        from phi2_assets.ml.speedups import lora_kernels

        (mask,) = ctx.saved_tensors
        return lora_kernels.dropout_grad(grad, mask, ctx.scale, ctx.dtype), None


class _ScaledAdd(torch.autograd.Function):
    """`result + (output * scale).to(result.dtype)` and its gradients, one kernel each way."""

    @staticmethod
    def forward(ctx, result: torch.Tensor, output: torch.Tensor, scale: float) -> torch.Tensor:
        from phi2_assets.ml.speedups import lora_kernels

        ctx.scale = scale
        return lora_kernels.scaled_add(result, output, scale)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        from phi2_assets.ml.speedups import lora_kernels

        return grad, lora_kernels.scaled_grad(grad, ctx.scale), None


def _lean_class(layer: torch.nn.Module) -> type | None:
    """The lean class for a LoRA layer with one vanilla adapter and no LoRA bias; None for every other module."""
    lean = {LoraLinear: LeanLoraLinear}
    if LoraLinear4bit is not None:
        lean[LoraLinear4bit] = LeanLoraLinear4bit
    chosen = lean.get(type(layer))
    if chosen is None or len(layer.lora_A) != 1 or layer.lora_variant:
        return None
    adapter = next(iter(layer.lora_A))
    plain = layer.lora_A[adapter].bias is None and layer.lora_B[adapter].bias is None
    return chosen if plain else None


@contextlib.contextmanager
def applied(model: torch.nn.Module) -> Iterator[None]:
    """While inside, every LoRA layer of `model` with one vanilla adapter runs the lean forward."""
    swapped = [(layer, type(layer), lean) for layer in model.modules() if (lean := _lean_class(layer)) is not None]
    if not swapped or not available():
        yield
        return
    for layer, _, lean in swapped:
        layer.__class__ = lean
    try:
        yield
    finally:
        for layer, original, _ in swapped:
            layer.__class__ = original
