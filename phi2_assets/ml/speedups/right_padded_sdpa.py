"""Right-padded SDPA: training attends under the causal mask alone, without the padding part.

What: TRL's collator pads on the right, and in a causal model no real token attends to a later position, so the
padding part of the mask changes nothing a labelled position computes (pads carry no label). Without it SDPA runs
plain causal attention in the flash kernel: half the scores of a masked kernel, and no per-shape plan on the host
(cuDNN's masked kernel plans every new batch shape). The model switches to an attention implementation registered
here (SDPA under a mask function that drops the padding) for the duration of training.
When it pays: GPU training on SDPA with length-varying batches. Losses equal the masked model's.
Knob: `speedups` of the training stage; verified transformers releases only (it registers into transformers'
attention and mask interfaces).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import AttentionInterface, PreTrainedModel
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from phi2_assets.ml.speedups import guards

RIGHT_PADDED_SDPA = "sdpa_right_padded"
# SDPA kernels for unmasked causal attention: cuDNN left out so that flash runs, which computes half the scores and
# plans nothing per shape. A restriction, not an order: `sdpa_kernel(set_priority=True)` would leave its order in
# force after the block.
CAUSAL_SDPA_KERNELS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def _sdpa_mask_without_padding(*args, attention_mask=None, **kwargs):
    return sdpa_mask(*args, attention_mask=None, **kwargs)


AttentionInterface.register(RIGHT_PADDED_SDPA, sdpa_attention_forward)
AttentionMaskInterface.register(RIGHT_PADDED_SDPA, _sdpa_mask_without_padding)


@contextlib.contextmanager
def applied(model: PreTrainedModel) -> Iterator[None]:
    """While inside, a model on SDPA attends under its causal (and any sliding-window) mask without the padding."""
    if model.config._attn_implementation != "sdpa" or not guards.requires(
            "right_padded_sdpa", transformers=guards.TRANSFORMERS):
        yield
        return
    model.set_attn_implementation(RIGHT_PADDED_SDPA)
    try:
        with sdpa_kernel(CAUSAL_SDPA_KERNELS):
            yield
    finally:
        model.set_attn_implementation("sdpa")
