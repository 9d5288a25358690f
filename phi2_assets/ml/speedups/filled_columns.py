"""Filled columns: each decoding step attends over the cache columns a row has filled, not the whole static cache.

What: a static cache is sized for its batch's longest prompt plus the new tokens, and right-aligned, so a row's
keys are one run of columns: from where its prompt starts to the last token written. Masked attention reads every
column of every row, the left padding of short prompts and the columns no step has written yet included; on a
large batch that read is most of a decoding step. Here a step calls PyTorch's variable-length flash kernel, which
reads for each row only its own run (start and length kept in device buffers, so the step can be replayed as a
CUDA graph). The cache is laid out token-major (batch, position, heads, head dim) so that its rows are one flat
sequence of tokens, as that kernel takes them; transformers' `StaticCache` code sees the same tensor shapes.
When it pays: batched greedy decoding on CUDA with flash attention (bf16 or fp16), the more the prompts of a batch
differ in length. The keys attended to are those the masked step attends to; the scores are summed by another
kernel, so results agree to bf16 rounding.
Knob: `cache: static` with `speedups: true`. It calls `torch.ops.aten._flash_attention_forward`, a private
operator, so it runs only on the verified torch releases whose operator takes `seqused_k`; elsewhere decoding
attends under the mask.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Iterator

import torch
from transformers import AttentionInterface, PreTrainedModel
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from phi2_assets.ml.speedups import guards

FILLED_COLUMNS_SDPA = "sdpa_filled_columns"
_HALF_PRECISION = (torch.bfloat16, torch.float16)  # the dtypes the flash kernel computes in


@dataclasses.dataclass(frozen=True)
class FilledColumns:
    """Where each row's keys lie in the flattened (rows x cache length) token-major cache, and how many are
    filled: row r attends to tokens `key_starts[r]` to `key_starts[r] + used[r]`."""

    query_starts: torch.Tensor  # one query per row: 0, 1, ..., rows (int32)
    key_starts: torch.Tensor  # row r's first prompt token: r x cache length + its padding columns, then the total
    used: torch.Tensor  # the row's prompt and the new tokens written so far (int32, advanced in place)
    cache_length: int

    @classmethod
    def after_prompts(cls, lengths: torch.Tensor, columns: int, cache_length: int) -> FilledColumns:
        """The runs after a prefill that right-aligned prompts of `lengths` in the first `columns` columns."""
        rows = len(lengths)
        base = torch.arange(rows + 1, device=lengths.device, dtype=torch.int32)
        padding = torch.cat([columns - lengths.to(torch.int32), base.new_zeros(1)])
        return cls(query_starts=base, key_starts=base * cache_length + padding, used=lengths.to(torch.int32).clone(),
                   cache_length=cache_length)

    def advance(self) -> None:
        """One more column written in every row (the step's new token)."""
        self.used.add_(1)


def _attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling: float | None = None,
               filled_columns: FilledColumns | None = None, **kwargs):
    """transformers' SDPA attention, except in a decoding step given `filled_columns`: one query per row against
    that row's filled run of the token-major cache, through the variable-length flash kernel."""
    if filled_columns is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    rows, heads, _, head_dim = query.shape
    tokens = rows * filled_columns.cache_length
    # views, not copies: the cache is token-major, so (rows, heads, columns, dim) transposed is contiguous
    flat_keys = key.transpose(1, 2).view(tokens, heads, head_dim)
    flat_values = value.transpose(1, 2).view(tokens, heads, head_dim)
    output = torch.ops.aten._flash_attention_forward(
        query.transpose(1, 2).reshape(rows, heads, head_dim), flat_keys, flat_values,
        filled_columns.query_starts, filled_columns.key_starts, 1, filled_columns.cache_length, 0.0, False, False,
        scale=scaling, seqused_k=filled_columns.used)[0]
    return output.view(rows, 1, heads, head_dim), None


AttentionInterface.register(FILLED_COLUMNS_SDPA, _attention)
AttentionMaskInterface.register(FILLED_COLUMNS_SDPA, sdpa_mask)


@functools.cache
def _operator_takes_used_lengths() -> bool:
    schema = torch.ops.aten._flash_attention_forward.default._schema
    return any(argument.name == "seqused_k" for argument in schema.arguments)


def available(model: PreTrainedModel) -> bool:
    """CUDA with flash attention, a half-precision model on SDPA, and a verified torch whose flash operator takes
    each row's used key count."""
    return (model.device.type == "cuda" and model.dtype in _HALF_PRECISION
            and model.config._attn_implementation == "sdpa" and torch.backends.cuda.is_flash_attention_available()
            and guards.requires("filled_columns", torch=guards.TORCH, transformers=guards.TRANSFORMERS)
            and _operator_takes_used_lengths())


@contextlib.contextmanager
def applied(model: PreTrainedModel) -> Iterator[None]:
    """While inside, a forward given `filled_columns=` attends over those runs; every other forward is SDPA's."""
    model.set_attn_implementation(FILLED_COLUMNS_SDPA)
    try:
        yield
    finally:
        model.set_attn_implementation("sdpa")
