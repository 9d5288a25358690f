"""Filled columns: each decoding step attends over the cache columns a row has filled, not the whole static cache.

What: a static cache is sized for its batch's longest prompt plus the new tokens, and right-aligned, so a row's
keys are one run of columns: from where its prompt starts to the last token written. Masked attention reads every
column of every row, the left padding of short prompts and the columns no step has written yet included; on a
large batch that read is most of a decoding step. Here a step runs `decode_attention_kernel`, a split-KV Triton
kernel that reads for each row only its own run (start and length kept in device buffers, so the step can be
replayed as a CUDA graph), straight from transformers' `StaticCache` tensors.
When it pays: batched greedy decoding on CUDA in bf16 or fp16, the more the prompts of a batch differ in length.
The keys attended to are those the masked step attends to; the scores are summed in another order, so results
agree to bf16 rounding.
Knob: `cache: static` with `speedups: true`. It needs Triton (CUDA builds of PyTorch on Linux ship it); elsewhere
decoding attends under the mask.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
from collections.abc import Iterator

import torch
from transformers import AttentionInterface, PreTrainedModel
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from phi2_assets.ml.speedups import guards
from phi2_assets.ml.speedups.batch_planning import attention_head_dim

FILLED_COLUMNS_SDPA = "sdpa_filled_columns"
_HALF_PRECISION = (torch.bfloat16, torch.float16)  # the dtypes the kernel is checked in
_HAS_TRITON = importlib.util.find_spec("triton") is not None


@dataclasses.dataclass(frozen=True)
class FilledColumns:
    """Which cache columns each row has filled: row r's keys are columns `starts[r]` to `starts[r] + used[r]`."""

    starts: torch.Tensor  # the row's first prompt column: the batch's prompt columns minus its prompt (int32)
    used: torch.Tensor  # the row's prompt and the new tokens written so far (int32, advanced in place)

    @classmethod
    def after_prompts(cls, lengths: torch.Tensor, columns: int) -> FilledColumns:
        """The runs after a prefill that right-aligned prompts of `lengths` in the first `columns` columns."""
        lengths = lengths.to(torch.int32)
        return cls(starts=columns - lengths, used=lengths.clone())

    def advance(self) -> None:
        """One more column written in every row (the step's new token)."""
        self.used.add_(1)


def _attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling: float | None = None,
               filled_columns: FilledColumns | None = None, **kwargs):
    """transformers' SDPA attention, except in a decoding step given `filled_columns`: one query per row against
    that row's filled run of the cache, through the split-KV kernel."""
    if filled_columns is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    from phi2_assets.ml.speedups.decode_attention_kernel import attend_filled_columns

    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    return attend_filled_columns(query, key, value, filled_columns.starts, filled_columns.used, scale), None


def head_dim_parts(head_dim: int) -> tuple[int, int] | None:
    """(low, high): the head dim as a power of two and a smaller power of two or 0; None where it is neither."""
    low = 1 << (head_dim.bit_length() - 1)
    high = head_dim - low
    return (low, high) if high & (high - 1) == 0 else None


AttentionInterface.register(FILLED_COLUMNS_SDPA, _attention)
AttentionMaskInterface.register(FILLED_COLUMNS_SDPA, sdpa_mask)


def available(model: PreTrainedModel) -> bool:
    """CUDA with Triton, a half-precision model on SDPA whose head dim the kernel reads (a power of two, or one plus
    a smaller one), and the verified torch and transformers."""
    if not (model.device.type == "cuda" and model.dtype in _HALF_PRECISION and _HAS_TRITON
            and model.config._attn_implementation == "sdpa"):
        return False
    return (head_dim_parts(attention_head_dim(model.config)) is not None
            and guards.requires("filled_columns", torch=guards.TORCH, transformers=guards.TRANSFORMERS))


@contextlib.contextmanager
def applied(model: PreTrainedModel) -> Iterator[None]:
    """While inside, a forward given `filled_columns=` attends over those runs; every other forward is SDPA's."""
    model.set_attn_implementation(FILLED_COLUMNS_SDPA)
    try:
        yield
    finally:
        model.set_attn_implementation("sdpa")
