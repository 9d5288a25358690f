"""Greedy decoding over a static KV cache sized for one batch, each decoding step replayed as a CUDA graph.

transformers' `generate` launches every kernel of every step from Python (about 1,000 a step for Phi-2) and
synchronises after each step; on an H200 that host time, not the GPU, set the pace of decoding (docs/BENCHMARKS.md).
A CUDA graph replays one recorded step with a single launch. Recording needs fixed shapes and addresses: a
`StaticCache` (its write index is a device tensor) and the step's inputs (token, position, attention mask) kept in
buffers updated in place. Recording costs one step of host time; nothing is compiled.

Prefill runs in chunks of consecutive rows (sorted by length when they arrive sorted), each padded only to its own
longest prompt, and its keys and values are copied into the batch's cache right-aligned: a batch may then mix
prompt lengths widely without computing the padding (docs/BENCHMARKS.md).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import torch
from transformers import DynamicCache, PreTrainedModel, StaticCache

log = logging.getLogger(__name__)
# Eager steps before recording: the first decoding steps build cuDNN plans and cuBLAS workspaces, which must exist
# before capture.
_WARM_UP_STEPS = 2
# Steps between checks that every row has stopped: each check waits for the GPU.
_STOP_CHECK_EVERY = 8
# Padded tokens per prefill forward: enough to keep an H200 busy, few enough that a chunk pads little.
PREFILL_CHUNK_TOKENS = 16_384


def greedy_static(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    max_new_tokens: int,
    stop_ids: Sequence[int],
    cache_length: int,
    cuda_graph: bool,
    prefill_chunk_tokens: int = PREFILL_CHUNK_TOKENS,
) -> torch.Tensor:
    """New token ids (rows x at most `max_new_tokens`) of greedy decoding of a left-padded batch: the tokens
    `model.generate(do_sample=False, min_new_tokens=1)` gives, up to each row's first stop token (a stopped row
    keeps decoding until all have stopped; what follows its stop token means nothing)."""
    rows, columns = input_ids.shape
    cache = StaticCache(config=model.config, max_cache_len=cache_length)
    positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # left padding: each row counts from its first token
    logits = _prefill(model, input_ids, attention_mask, positions, cache, prefill_chunk_tokens)
    stops = torch.tensor(list(stop_ids), device=input_ids.device)
    logits[:, stops] = torch.finfo(logits.dtype).min  # no summary may end before it starts
    next_ids = logits.argmax(-1)
    tokens, finished = [next_ids], torch.isin(next_ids, stops)

    step_ids, step_positions = next_ids[:, None].clone(), positions[:, -1:] + 1
    # a prepared 4D mask reaches attention as it is: the prompt's padding, then each new column as it is written
    step_mask = torch.zeros(rows, 1, 1, cache_length, dtype=torch.bool, device=input_ids.device)
    step_mask[:, 0, 0, :columns] = attention_mask.bool()

    def step() -> torch.Tensor:
        return model(input_ids=step_ids, attention_mask=step_mask, position_ids=step_positions, cache=cache).logits[:, -1]

    run: Callable[[], torch.Tensor] = step
    for index in range(1, max_new_tokens):
        step_mask[:, 0, 0, columns + index - 1] = True
        if cuda_graph and input_ids.is_cuda and index == _WARM_UP_STEPS + 1:
            try:
                run = _recorded(step)
            except RuntimeError as error:  # e.g. a kernel that syncs with the host; recording ran nothing, so go on eagerly
                log.warning("decoding step not recordable as a CUDA graph (%s); this batch decodes eagerly", error)
        next_ids = run().argmax(-1)
        tokens.append(next_ids)
        finished |= torch.isin(next_ids, stops)
        if index % _STOP_CHECK_EVERY == 0 and bool(finished.all()):
            break
        step_ids.copy_(next_ids[:, None])
        step_positions.add_(1)
    return torch.stack(tokens, dim=1)


def _prefill(model, input_ids, attention_mask, positions, cache: StaticCache, chunk_tokens: int) -> torch.Tensor:
    """Last-position logits of every row, and `cache` holding the prompts' keys and values in columns
    [0, prompt columns): each chunk of rows computes only its own last `width` columns, into a transient cache."""
    rows, columns = input_ids.shape
    lengths = attention_mask.sum(-1).tolist()
    logits = []
    for start, end in _row_chunks(lengths, chunk_tokens):
        width = max(lengths[start:end])
        part = DynamicCache(config=model.config)
        window = slice(columns - width, columns)
        logits.append(model(input_ids=input_ids[start:end, window], attention_mask=attention_mask[start:end, window],
                            position_ids=positions[start:end, window], cache=part, logits_to_keep=1).logits[:, -1])
        if not start:
            keys = part.layers[0].keys
            cache.early_initialization(rows, keys.shape[1], keys.shape[-1], keys.dtype, keys.device)
        for layer, chunk in zip(cache.layers, part.layers):
            layer.keys[start:end, :, window] = chunk.keys
            layer.values[start:end, :, window] = chunk.values
    for layer in cache.layers:
        layer.cumulative_length.fill_(columns)  # decoding writes its first token after the prompt columns
    return torch.cat(logits)


def _row_chunks(lengths: Sequence[int], chunk_tokens: int) -> list[tuple[int, int]]:
    """Consecutive row ranges whose rows x longest length stays within `chunk_tokens` (a row alone may exceed it)."""
    chunks, start, widest = [], 0, 0
    for index, length in enumerate(lengths):
        widest = max(widest, length)
        if index > start and (index + 1 - start) * widest > chunk_tokens:
            chunks.append((start, index))
            start, widest = index, length
    return chunks + [(start, len(lengths))] if lengths else chunks


def _recorded(step: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
    """`step` recorded as a CUDA graph: replaying it runs every kernel again on the same buffers (recording runs
    none, so the cache's write index does not move)."""
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        output = step()

    def replay() -> torch.Tensor:
        graph.replay()
        return output

    return replay
