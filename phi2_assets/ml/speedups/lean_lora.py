"""Lean LoRA: each PEFT LoRA layer's forward as the few tensor ops it computes, without PEFT's per-call Python.

What: PEFT's LoRA `Linear` forward checks its arguments, pops keyword groups, walks the active adapters, looks up
four module dicts and calls `lora_A` and `lora_B` as modules; its 4-bit variant also copies the base layer's output
(a defensive `clone`, a full read and write of every projection's output). A QLoRA step of Phi-2 runs 192 of these
forwards. `LeanLoraLinear` and `LeanLoraLinear4bit` compute the same ops in the same order and dtypes (the base
layer, the input cast to the adapter's dtype, dropout, A, B, the scale, the add), so outputs and gradients are
PEFT's bit for bit; the copy is left out because nothing writes into the base output in place. A scale that is a
power of two (alpha / r = 2 in the seed recipe) multiplies A's rank-r output instead of B's full-width output: the
same bits (scaling by a power of two is exact, so it commutes with B's matmul, forward and backward), without a
read and write of every adapter's whole output in each direction.
With `kernel_dropout` (the knob `lora_dropout_kernel`), an adapter whose input is a half-precision CUDA tensor of
its own dtype (TRL's bf16 adapters on a 4-bit model) computes A(dropout(x)) in `lora_dropout_kernel`'s kernels: the
dropout drawn inside the matmul, one keep bit per element kept for the backward pass instead of a mask and a
dropped copy. The same dropout with other draws than PyTorch's, so this part is not bit for bit.
When it pays: training on a GPU, where Python around the step sets the pace (and the GPU's memory traffic, once
graphs remove the launches); on CPU it is neutral.
Knob: `speedups` of the training stage (with `lora_dropout_kernel` for the dropout in kernels). It applies to
layers with one vanilla LoRA adapter (no DoRA or other variant, no LoRA bias), falls back to PEFT's forward for
merged or disabled adapters and for per-call adapter names, and runs only on the verified PEFT release; the layers
get their own class back afterwards.
"""

from __future__ import annotations

import contextlib
import importlib.util
import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from peft.tuners.lora import Linear as LoraLinear

from phi2_assets.ml.speedups import guards

_HAS_TRITON = importlib.util.find_spec("triton") is not None  # CUDA builds of PyTorch on Linux ship it
_HALF_PRECISION = (torch.bfloat16, torch.float16)
_KERNEL_RANKS = (16, 32, 64)  # ranks the kernels' matmuls take: powers of two, at least 16

try:  # PEFT defines its 4-bit LoRA layer only where bitsandbytes is installed
    from peft.tuners.lora.bnb import Linear4bit as LoraLinear4bit
except ImportError:
    LoraLinear4bit = None


def available() -> bool:
    return guards.requires("lean_lora", peft=guards.PEFT)


def scales_on_rank(scale: float) -> bool:
    """Whether multiplying A's output by `scale` gives the bits that multiplying B's output does: true for powers of
    two, whose product only shifts the exponent."""
    return scale > 0 and math.frexp(scale)[0] == 0.5


def adapter_output(dropped: torch.Tensor, a_weight: torch.Tensor, b_weight: torch.Tensor,
                   scale: float) -> torch.Tensor:
    """B(A(dropped)) * scale, the adapter's output from its input after dropout, with the scale on the rank-r side
    where that changes no bit."""
    return _up(F.linear(dropped, a_weight), b_weight, scale)


def _up(reduced: torch.Tensor, b_weight: torch.Tensor, scale: float) -> torch.Tensor:
    """B(reduced) * scale, the scale applied before B where that changes no bit."""
    if scales_on_rank(scale):
        return F.linear(reduced * scale, b_weight)
    return F.linear(reduced, b_weight) * scale


def _output_of(x: torch.Tensor, a_weight: torch.Tensor, b_weight: torch.Tensor, dropout: torch.nn.Module,
               scale: float, kernel_dropout: bool) -> torch.Tensor:
    """The adapter's output for the layer input `x`, in the adapter's dtype: dropout and A in one kernel where
    `kernel_dropout` asks and the kernels take these tensors, else PyTorch's ops as PEFT runs them."""
    if kernel_dropout and _kernel_takes(x, a_weight, dropout):
        return _up(_KernelDropoutDown.apply(x, a_weight, dropout.p), b_weight, scale)
    adapter_input = x if x.dtype == a_weight.dtype else x.to(a_weight.dtype)
    return adapter_output(dropout(adapter_input), a_weight, b_weight, scale)


def _kernel_takes(x: torch.Tensor, a_weight: torch.Tensor, dropout: torch.nn.Module) -> bool:
    """Whether `lora_dropout_kernel` computes A(dropout(x)) here: a half-precision CUDA input of the adapter's own
    dtype (TRL's bf16 adapters on a 4-bit model), a training-mode dropout, a rank of 16 to 64 and features in
    blocks of 64."""
    return (_HAS_TRITON and x.is_cuda and x.dtype == a_weight.dtype and x.dtype in _HALF_PRECISION
            and type(dropout) is torch.nn.Dropout and dropout.training and 0 < dropout.p < 1
            and torch.is_grad_enabled() and a_weight.shape[0] in _KERNEL_RANKS and x.shape[-1] % 64 == 0
            and x.is_contiguous())


class _KernelDropoutDown(torch.autograd.Function):
    """A(dropout(x)) with the dropout drawn inside the kernels: the backward pass keeps x (one tensor for all the
    adapters on it: query, key, value and the first MLP layer share theirs) and one keep bit per element, instead of
    a mask and a dropped copy of x per adapter."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, a_weight: torch.Tensor, p: float) -> torch.Tensor:
        from phi2_assets.ml.speedups import lora_dropout_kernel

        flat = x.reshape(-1, x.shape[-1])
        # drawn from torch's generator, so the run's seed sets the masks (and a CUDA graph's replays draw anew)
        seed = torch.randint(2**31 - 1, (1,), device=x.device)
        reduced, bits = lora_dropout_kernel.down(flat, a_weight, p, seed)
        ctx.save_for_backward(flat, a_weight, bits)
        ctx.p, ctx.input_shape = p, x.shape
        return reduced.reshape(*x.shape[:-1], a_weight.shape[0])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        from phi2_assets.ml.speedups import lora_dropout_kernel

        flat, a_weight, bits = ctx.saved_tensors
        grad = grad.reshape(-1, grad.shape[-1])
        x_grad = a_grad = None
        if ctx.needs_input_grad[0]:
            x_grad = lora_dropout_kernel.input_grad(grad, a_weight, bits, ctx.p, flat.dtype).reshape(ctx.input_shape)
        if ctx.needs_input_grad[1]:
            a_grad = lora_dropout_kernel.weight_grad(flat, grad, bits, ctx.p).to(a_weight.dtype)
        return x_grad, a_grad, None


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

    kernel_dropout = False

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        adapter = None if args or kwargs else _adapter(self)
        if adapter is None:
            return super().forward(x, *args, **kwargs)
        a_weight, b_weight, dropout, scale = adapter
        result = self.base_layer(x)
        return (result + _output_of(x, a_weight, b_weight, dropout, scale, self.kernel_dropout)).to(result.dtype)


class KernelDropoutLoraLinear(LeanLoraLinear):
    """The lean forward with dropout and A in `lora_dropout_kernel`'s kernels where they take the input."""

    kernel_dropout = True


if LoraLinear4bit is not None:

    class LeanLoraLinear4bit(LoraLinear4bit):
        """PEFT's 4-bit LoRA forward for one vanilla adapter: the adapter's output cast to the base output's dtype
        before the add, as PEFT does (outside autocast), without its copy of the base output."""

        kernel_dropout = False

        def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
            adapter = None if args or kwargs or torch.is_autocast_enabled() else _adapter(self)
            if adapter is None:
                return super().forward(x, *args, **kwargs)
            a_weight, b_weight, dropout, scale = adapter
            result = self.base_layer(x)
            output = _output_of(x, a_weight, b_weight, dropout, scale, self.kernel_dropout)
            return result + output.to(result.dtype)

    class KernelDropoutLoraLinear4bit(LeanLoraLinear4bit):
        """The lean 4-bit forward with dropout and A in `lora_dropout_kernel`'s kernels where they take the
        input."""

        kernel_dropout = True


def _lean_class(layer: torch.nn.Module, kernel_dropout: bool) -> type | None:
    """The lean class for a LoRA layer with one vanilla adapter and no LoRA bias (its dropout in kernels where
    `kernel_dropout` asks); None for every other module."""
    lean = {LoraLinear: KernelDropoutLoraLinear if kernel_dropout else LeanLoraLinear}
    if LoraLinear4bit is not None:
        lean[LoraLinear4bit] = KernelDropoutLoraLinear4bit if kernel_dropout else LeanLoraLinear4bit
    chosen = lean.get(type(layer))
    if chosen is None or len(layer.lora_A) != 1 or layer.lora_variant:
        return None
    adapter = next(iter(layer.lora_A))
    plain = layer.lora_A[adapter].bias is None and layer.lora_B[adapter].bias is None
    return chosen if plain else None


@contextlib.contextmanager
def applied(model: torch.nn.Module, kernel_dropout: bool = False) -> Iterator[None]:
    """While inside, every LoRA layer of `model` with one vanilla adapter runs the lean forward, with its dropout
    in kernels where `kernel_dropout` asks."""
    swapped = [(layer, type(layer), lean) for layer in model.modules()
               if (lean := _lean_class(layer, kernel_dropout)) is not None]
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
