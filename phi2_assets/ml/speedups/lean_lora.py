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
When it pays: training on a GPU, where Python around the step sets the pace (and the GPU's memory traffic, once
graphs remove the launches); on CPU it is neutral.
Knob: `speedups` of the training stage. It applies to layers with one vanilla LoRA adapter (no DoRA or other
variant, no LoRA bias), falls back to PEFT's forward for merged or disabled adapters and for per-call adapter
names, and runs only on the verified PEFT release; the layers get their own class back afterwards.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from peft.tuners.lora import Linear as LoraLinear

from phi2_assets.ml.speedups import guards

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
    reduced = F.linear(dropped, a_weight)
    if scales_on_rank(scale):
        return F.linear(reduced * scale, b_weight)
    return F.linear(reduced, b_weight) * scale


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
        return (result + adapter_output(dropout(adapter_input), a_weight, b_weight, scale)).to(result.dtype)


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
            adapter_input = x if x.dtype == a_weight.dtype else x.to(a_weight.dtype)
            output = adapter_output(dropout(adapter_input), a_weight, b_weight, scale)
            return result + output.to(result.dtype)


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
