"""Shrinking batch: greedy decoding over the dynamic KV cache that drops each row from the batch once it stops.

What: `model.generate` decodes every row of a batch until the last one stops; a row that has written its newline
or EOS still costs a full forward per step (on Gemma's 262k-word head, most of a CPU decoding step). Here a row
leaves the batch, with its cache rows, at the step it stops, so each step computes only the rows still writing.
When it pays: batched greedy decoding where the summaries' lengths differ (every batch), on a device that computes
row by row: the CPU. Rows that stop early cost nothing after their stop.
Knob: `speedups` of the generation stages, with `cache: dynamic` and `num_beams: 1`. It mirrors the inputs
`generate` builds (positions from the attention mask, last-position logits), so it runs only on the verified
transformers releases; elsewhere `model.generate` decodes.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import DynamicCache, PreTrainedModel

from phi2_assets.ml.speedups import guards


def available() -> bool:
    return guards.requires("shrinking_batch", transformers=guards.TRANSFORMERS)


def greedy_shrinking(model: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                     max_new_tokens: int, stop_ids: Sequence[int]) -> list[list[int]]:
    """New token ids per row of greedy decoding of a left-padded batch, each row up to and including its first
    stop token: the tokens `model.generate(do_sample=False, min_new_tokens=1)` gives, without what follows a stop."""
    cache = DynamicCache(config=model.config)
    positions = (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)
    # the last column named by index, so the LM head gets a contiguous copy of its hidden states: a sliced view
    # sends a bf16 CPU matmul through a batched copy of the whole head weight per row
    last_column = torch.tensor([input_ids.shape[1] - 1], device=input_ids.device)
    logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions, cache=cache,
                   logits_to_keep=last_column).logits[:, -1].float()
    stops = torch.tensor(list(stop_ids), device=input_ids.device)
    logits[:, stops] = torch.finfo(logits.dtype).min  # no summary may end before it starts
    next_ids = logits.argmax(-1)
    live = torch.arange(input_ids.shape[0], device=input_ids.device)
    tokens: list[list[int]] = [[] for _ in range(input_ids.shape[0])]
    mask, step_positions = attention_mask, positions[:, -1:] + 1
    for index in range(max_new_tokens):
        for row, token in zip(live.tolist(), next_ids.tolist(), strict=True):
            tokens[row].append(token)
        going = ~torch.isin(next_ids, stops)
        if index == max_new_tokens - 1 or not bool(going.any()):
            break
        if not bool(going.all()):
            kept = going.nonzero().squeeze(1)
            cache.batch_select_indices(kept)
            live, next_ids, mask, step_positions = live[kept], next_ids[kept], mask[kept], step_positions[kept]
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
        logits = model(input_ids=next_ids[:, None], attention_mask=mask, position_ids=step_positions,
                       cache=cache).logits[:, -1]
        next_ids, step_positions = logits.argmax(-1), step_positions + 1
    return tokens
