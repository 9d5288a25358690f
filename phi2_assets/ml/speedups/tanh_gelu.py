"""Tanh GELU in one kernel: Phi's `gelu_new` activation as `F.gelu(approximate="tanh")`.

What: transformers' `NewGELUActivation` computes the tanh approximation of GELU as eight elementwise ops, each kept
for the backward pass; `GELUTanh` is the same function in one fused kernel.
When it pays: every Phi forward and backward on CUDA (faster steps, less activation memory); on CPU it is neutral.
Cost: the fused kernel rounds differently in the last bits (losses agree to 1e-4 relative).
Knob: `speedups` of the stage. The activations come back as they were after the stage.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from transformers.activations import GELUTanh, NewGELUActivation

from phi2_assets.ml.speedups import guards


@contextlib.contextmanager
def applied(model: torch.nn.Module) -> Iterator[None]:
    """While inside, every `NewGELUActivation` of `model` is a `GELUTanh`."""
    swapped = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
               if isinstance(child, NewGELUActivation)]
    if not swapped or not guards.requires("tanh_gelu", transformers=guards.TRANSFORMERS):
        yield
        return
    for parent, name, _ in swapped:
        setattr(parent, name, GELUTanh())
    try:
        yield
    finally:
        for parent, name, original in swapped:
            setattr(parent, name, original)
