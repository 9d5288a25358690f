"""Decoded NF4: while a 4-bit model trains, each frozen 4-bit layer computes with its weights decoded to bf16 once.

What: bitsandbytes decodes a `Linear4bit`'s NF4 weights to bf16 in every forward and again in every backward pass
(three kernels each with double quantisation, and its Python autograd function around them), then runs a plain
bf16 matmul. The base weights are frozen during LoRA training, so their decoded copy never changes: here each
layer decodes them once when training starts and computes `F.linear` with that copy, forward and backward, the
very values and matmul bitsandbytes computes at a training batch's size. The model stays 4-bit: the copy is dropped
when training ends, and the adapter trains against the NF4 weights it is saved for.
When it pays: QLoRA training with memory to spare: recipes that keep their activations (`gradient_checkpointing:
false`, as in the `phi2` profile). A recipe that checkpoints activations to save memory keeps decoding per pass.
Cost: the decoded weights, 2 bytes per base weight (about 5 GiB for Phi-2) for the length of training, taken only
where the device keeps twice that free beside them.
Knob: `speedups` of the training stage; verified bitsandbytes release only.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import psutil
import torch
import torch.nn.functional as F

from phi2_assets.ml.speedups import batch_planning, guards

log = logging.getLogger(__name__)
# Free device memory that must remain after decoding, as a share of the decoded bytes: room for the steps' own peaks.
_HEADROOM = 2.0

try:
    import bitsandbytes
    from bitsandbytes.nn import Linear4bit
except ImportError:  # CPU-only installs without bitsandbytes never hold 4-bit layers
    bitsandbytes, Linear4bit = None, None


def available() -> bool:
    return Linear4bit is not None and guards.requires("decoded_nf4", bitsandbytes=guards.BITSANDBYTES)


def decode(layer) -> torch.Tensor:
    """The layer's weights as bitsandbytes decodes them for a large matmul: the nested absmax decoded to fp32 plus
    its offset, then NF4 straight to the compute dtype."""
    state = layer.weight.quant_state
    absmax = state.absmax
    if state.nested:
        absmax = bitsandbytes.functional.dequantize_blockwise(state.absmax, state.state2) + state.offset
    return torch.ops.bitsandbytes.dequantize_4bit.default(
        layer.weight.data.view(-1, 1), absmax.float(), state.blocksize, state.quant_type, state.shape,
        layer.compute_dtype or torch.bfloat16)


if Linear4bit is not None:

    class DecodedLinear4bit(Linear4bit):
        """`Linear4bit` computing with `decoded_weight`: the input cast to the compute dtype, the bias to the
        input's, the output back to the input's dtype, as `Linear4bit.forward` does."""

        decoded_weight: torch.Tensor

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            weight = self.decoded_weight
            bias = self.bias
            if bias is not None and bias.dtype != weight.dtype:
                bias = bias.to(weight.dtype)
            return F.linear(x.to(weight.dtype), weight, bias).to(x.dtype)


def _free_bytes(device: torch.device) -> int:
    """What the device has free, on CUDA counting what PyTorch's allocator holds cached but unused (e.g. a
    generation's)."""
    if device.type == "cuda":
        return batch_planning.free_cuda_bytes(device)
    return psutil.virtual_memory().available


def _fits(layers: list) -> bool:
    """Whether the decoded copies leave `_HEADROOM` times their size free on the layers' device."""
    decoded_bytes = sum(layer.weight.quant_state.shape.numel() * 2 for layer in layers)
    return _free_bytes(layers[0].weight.device) - decoded_bytes > _HEADROOM * decoded_bytes


@contextlib.contextmanager
def applied(model: torch.nn.Module, keeps_activations: bool) -> Iterator[None]:
    """While inside, every `Linear4bit` of `model` computes with its decoded weights, where the recipe
    `keeps_activations` (no activation checkpointing) and the copies fit in free memory."""
    layers = [] if Linear4bit is None else [module for module in model.modules() if type(module) is Linear4bit]
    if not layers or not keeps_activations or not available():
        yield
        return
    if not _fits(layers):
        log.warning("speed-up decoded_nf4 is off: the decoded weights would leave too little free memory")
        yield
        return
    for layer in layers:
        layer.decoded_weight = decode(layer)
        layer.__class__ = DecodedLinear4bit
    try:
        yield
    finally:
        for layer in layers:
            layer.__class__ = Linear4bit
            del layer.decoded_weight
