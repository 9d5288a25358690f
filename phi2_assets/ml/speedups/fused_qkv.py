"""Fused QKV: in generation, each Phi attention layer's query, key and value projections as one matmul.

What: `PhiAttention` projects its input three times, with three matmuls of the hidden size's width. A decoding step
of a few hundred rows gives each of them too few output tiles to fill a large GPU; one matmul three times as wide
fills it, and prefill launches one kernel instead of three. The fused weight and bias are the three stacked, so
each output is the same dot product; cuBLAS may pick another kernel for the wider shape, so results agree to
bf16 rounding.
When it pays: batched generation on CUDA with the dense (merged) model. Layers with LoRA or 4-bit projections are
left as they are, and so is training.
Cost: a copy of the three projections' weights for the length of the stage (about 1.3 GiB for Phi-2).
Knob: `speedups` of the generation stage. It works through `fused_rotary`'s copy of `PhiAttention.forward`, so it
runs where that does.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn
from transformers import PreTrainedModel

from phi2_assets.ml.speedups import fused_rotary


def _plain_projections(attention: nn.Module) -> list[nn.Linear] | None:
    projections = [attention.q_proj, attention.k_proj, attention.v_proj]
    plain = all(type(p) is nn.Linear and p.bias is not None and p.weight.is_cuda for p in projections)
    return projections if plain else None


@contextlib.contextmanager
def applied(model: PreTrainedModel) -> Iterator[None]:
    """While inside, every `fused_rotary` attention of `model` with plain CUDA projections projects through one
    stacked weight (`qkv_weight`, `qkv_bias`, split at `qkv_sizes`); the copies go afterwards."""
    fused = [module for module in model.modules() if type(module) is fused_rotary.FusedRotaryPhiAttention
             and _plain_projections(module) is not None]
    with torch.no_grad():
        for attention in fused:
            projections = _plain_projections(attention)
            attention.qkv_weight = torch.cat([p.weight for p in projections])
            attention.qkv_bias = torch.cat([p.bias for p in projections])
            attention.qkv_sizes = [p.out_features for p in projections]
    try:
        yield
    finally:
        for attention in fused:
            del attention.qkv_weight, attention.qkv_bias, attention.qkv_sizes
