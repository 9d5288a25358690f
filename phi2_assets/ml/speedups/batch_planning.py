"""Batch planner: on CUDA, prompts share a generate call where a model of generation time says the split of
length-sorted prompts is quickest, within free memory.

The model, in seconds: prefill computes rows x width padded tokens (2 FLOPs per parameter each; nothing to choose
where prefill runs in chunks of similar length, as the static-cache path does, since then it computes each
prompt's own tokens whatever the split), and each of up to `max_new_tokens` decoding steps pays a fixed cost
(weights read and small kernels with CUDA graphs; the host's launches without) plus rows x cache length cached
tokens read. Big batches pay the fixed cost fewer times; batches of similar length read less padding.
Knob: `batch_size: 0` with `speedups: true` on a generation stage; a positive `batch_size` (or `speedups: false`)
means fixed batches. Public torch and transformers APIs only: no version guard.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from transformers import PreTrainedModel

# Share of free CUDA memory the KV cache and activations of one batch may take.
_FREE_MEMORY_SHARE = 0.6
_MAX_AUTO_BATCH = 512
# A static cache's length is rounded up to this, so batches of similar length share shapes (cuDNN plans per shape).
STATIC_CACHE_ROUNDING = 64
# The cost model's rates, fitted to H200 timings of Phi-2 generation (docs/PERFORMANCE.md, "Batch planner"): cache
# reads and prefill FLOPs per second, a CUDA-graphed step's fixed part in weight reads, an eager step's host time.
_CACHE_BYTES_PER_SECOND = 4.5e12
_PREFILL_FLOPS_PER_SECOND = 450e12
_GRAPHED_STEP_OVER_WEIGHT_READ = 5.0
_EAGER_STEP_SECONDS = 0.025


def cache_length(prompt_columns: int, max_new_tokens: int) -> int:
    return -(-(prompt_columns + max_new_tokens) // STATIC_CACHE_ROUNDING) * STATIC_CACHE_ROUNDING


def attention_head_dim(config) -> int:
    """The size of one attention head, as transformers' attention modules take it from the model's config."""
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def kv_bytes_per_token(model: PreTrainedModel) -> int:
    """K and V of every layer for one token, in bf16."""
    config = model.config.get_text_config()
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    return 2 * config.num_hidden_layers * heads * attention_head_dim(config) * (torch.finfo(torch.bfloat16).bits // 8)


def bytes_per_token(model: PreTrainedModel, num_beams: int) -> int:
    """A token's KV cache plus a prefill's hidden states (a few times the hidden size) as headroom, per beam."""
    hidden = model.config.get_text_config().hidden_size * (torch.finfo(torch.bfloat16).bits // 8)
    return (kv_bytes_per_token(model) + 8 * hidden) * num_beams


def free_cuda_bytes(device: torch.device) -> int:
    """What the CUDA device has free, counting memory PyTorch's allocator holds cached but unused (an earlier
    batch's cache) as free."""
    return (torch.cuda.mem_get_info(device)[0] + torch.cuda.memory_reserved(device)
            - torch.cuda.memory_allocated(device))


def generation_memory_budget(model: PreTrainedModel) -> int:
    """Bytes one batch's KV cache and prefill activations may take: a share of what is free on the device."""
    return int(free_cuda_bytes(model.device) * _FREE_MEMORY_SHARE)


def plan_batches(model: PreTrainedModel, lengths: Sequence[int], order: Sequence[int], max_new_tokens: int,
                 num_beams: int, chunked_prefill: bool, graphed_steps: bool) -> list[list[int]]:
    """Prompt indices per generate call, in `order`: the quickest split under the cost model within free CUDA
    memory (`quickest_batches`)."""
    weight_read = model.get_memory_footprint() / _CACHE_BYTES_PER_SECOND
    return quickest_batches(
        lengths, order, max_new_tokens,
        token_slots=generation_memory_budget(model) // bytes_per_token(model, num_beams),
        prefill_cost=0.0 if chunked_prefill else 2 * model.num_parameters() / _PREFILL_FLOPS_PER_SECOND,
        step_cost=_GRAPHED_STEP_OVER_WEIGHT_READ * weight_read if graphed_steps else _EAGER_STEP_SECONDS,
        cache_cost=kv_bytes_per_token(model) * num_beams / _CACHE_BYTES_PER_SECOND,
    )


def quickest_batches(lengths: Sequence[int], order: Sequence[int], max_new_tokens: int, token_slots: int,
                     prefill_cost: float, step_cost: float, cache_cost: float) -> list[list[int]]:
    """Consecutive prompts of `order` per batch, split where the modelled time is least (dynamic programming over
    split points): a batch of `rows` prompts whose longest has `width` tokens costs `prefill_cost * rows * width +
    max_new_tokens * (step_cost + cache_cost * rows * cache_length(width))`, and its cache
    (rows x cache length) must fit `token_slots`. A prompt too long for the budget alone still gets a batch of one."""
    widths = np.asarray([lengths[index] for index in order], dtype=np.int64)
    best = np.full(len(widths) + 1, np.inf)
    best[0] = 0.0
    start_of = np.zeros(len(widths) + 1, dtype=np.int64)
    for end in range(1, len(widths) + 1):
        starts = np.arange(max(0, end - _MAX_AUTO_BATCH), end)
        widest = np.maximum.accumulate(widths[starts][::-1])[::-1]  # longest prompt of order[start:end]
        rows = end - starts
        caches = cache_length(widest, max_new_tokens)
        costs = best[starts] + prefill_cost * rows * widest + max_new_tokens * (step_cost + cache_cost * rows * caches)
        costs[(rows > 1) & (rows * caches > token_slots)] = np.inf
        cheapest = int(np.argmin(costs))
        best[end], start_of[end] = costs[cheapest], starts[cheapest]
    batches, end = [], len(widths)
    while end:
        batches.append(list(order[start_of[end]:end]))
        end = int(start_of[end])
    return batches[::-1]
