"""Static decoding: greedy decoding over a static KV cache sized for one batch, each step replayed as a CUDA graph.

What: transformers' `generate` launches every kernel of every step from Python (about 1,000 a step for Phi-2) and
synchronises after each step; on a fast GPU that host time, not the GPU, sets the pace of decoding. A CUDA graph
replays one recorded step with a single launch. Recording needs fixed shapes and addresses: a `StaticCache` (its
write index is a device tensor) and the step's inputs (token, position, attention mask) kept in buffers updated in
place. Recording costs one step of host time; nothing is compiled.
Prefill runs in chunks of consecutive rows (sorted by length when they arrive sorted), each padded only to its own
longest prompt. A chunk runs left-aligned, padded on the right, so plain causal attention needs no padding mask
and SDPA takes the flash kernel; each layer writes its keys and values straight into the batch's cache,
right-aligned as decoding needs them (on CUDA by `right_aligning_kernel`, elsewhere by `torch.gather`). On CUDA
each decoding step attends only over the columns each row has filled (`filled_columns`); elsewhere under the batch's
padding mask.
When it pays: batched greedy generation on CUDA. The tokens are `model.generate`'s (greedy, `min_new_tokens=1`).
Knob: `cache: static` (greedy only) with `speedups: true`; `cuda_graph: false` decodes the same way eagerly. It
writes `StaticCache` layers' fields directly, so it runs only on the verified transformers releases; elsewhere
`cache: static` goes to `model.generate(cache_implementation="static")`.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
from collections.abc import Callable, Sequence

import torch
from torch.nn.attention import sdpa_kernel
from transformers import DynamicCache, PreTrainedModel, StaticCache

from phi2_assets.ml.speedups import filled_columns, guards, kernels_ahead
from phi2_assets.ml.speedups.right_padded_sdpa import CAUSAL_SDPA_KERNELS

log = logging.getLogger(__name__)
_HAS_TRITON = importlib.util.find_spec("triton") is not None  # CUDA builds of PyTorch on Linux ship it
# Eager steps before recording: the first decoding steps build cuDNN plans and cuBLAS workspaces, which must exist
# before capture.
_WARM_UP_STEPS = 2
# Steps between checks that every row has stopped: each check waits for the GPU.
_STOP_CHECK_EVERY = 8
# Padded tokens per prefill forward: enough to keep a large GPU busy, few enough that a chunk pads little.
PREFILL_CHUNK_TOKENS = 16_384



def available() -> bool:
    return guards.requires("static_decoding", transformers=guards.TRANSFORMERS)


def greedy_static(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    max_new_tokens: int,
    stop_ids: Sequence[int],
    cache_length: int,
    cuda_graph: bool,
    prefill_chunk_tokens: int | None = None,
) -> torch.Tensor:
    """New token ids (rows x at most `max_new_tokens`) of greedy decoding of a left-padded batch: the tokens
    `model.generate(do_sample=False, min_new_tokens=1)` gives, up to each row's first stop token (a stopped row
    keeps decoding until all have stopped; what follows its stop token means nothing). Prefill chunks hold at most
    `prefill_chunk_tokens` padded tokens (default `PREFILL_CHUNK_TOKENS`)."""
    # before the prefill: copying from the host waits for the GPU, and the prefill should run behind the host
    stops = torch.tensor(list(stop_ids), device=input_ids.device)
    cache, lengths, first_ids = prefilled(model, input_ids, attention_mask, cache_length, stops,
                                          prefill_chunk_tokens or PREFILL_CHUNK_TOKENS)
    attend_filled = filled_columns.available(model)
    with filled_columns.applied(model) if attend_filled else contextlib.nullcontext():
        return _decode(model, first_ids, attention_mask, lengths, cache, cache_length, max_new_tokens, stops,
                       cuda_graph, attend_filled)


def prefilled(model: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor, cache_length: int,
              stops: torch.Tensor, chunk_tokens: int) -> tuple[StaticCache, torch.Tensor, torch.Tensor]:
    """The prefill of a left-padded batch: its static cache holding the prompts, each row's prompt length, and each
    row's first new token (never one of `stops`: no summary may end before it starts)."""
    cache = StaticCache(config=model.config, max_cache_len=cache_length)
    lengths = attention_mask.sum(-1)
    logits = _prefill(model, input_ids, lengths, cache, chunk_tokens)
    logits[:, stops] = torch.finfo(logits.dtype).min
    return cache, lengths, logits.argmax(-1)


def _decode(model, first_ids: torch.Tensor, attention_mask: torch.Tensor, lengths: torch.Tensor, cache: StaticCache,
            cache_length: int, max_new_tokens: int, stops: torch.Tensor, cuda_graph: bool,
            attend_filled: bool) -> torch.Tensor:
    """The decoding steps after the prefill chose `first_ids`: every row's new tokens, the first included."""
    rows, columns = attention_mask.shape
    tokens, finished = [first_ids], torch.isin(first_ids, stops)
    # a row's first new token follows its prompt
    step_ids, step_positions = first_ids[:, None].clone(), lengths[:, None].clone()
    # a prepared 4D mask reaches attention as it is: the prompt's padding, then each new column as it is written
    step_mask = torch.zeros(rows, 1, 1, cache_length, dtype=torch.bool, device=first_ids.device)
    step_mask[:, 0, 0, :columns] = attention_mask.bool()
    filled = (filled_columns.FilledColumns.after_prompts(lengths, columns)
              if attend_filled else None)
    attending = {"filled_columns": filled} if filled is not None else {}
    if attend_filled:  # the first batch's prefill runs on the GPU meanwhile
        kernels_ahead.wait(*kernels_ahead.DECODING_KERNELS)

    def step() -> torch.Tensor:
        return model(input_ids=step_ids, attention_mask=step_mask, position_ids=step_positions, cache=cache,
                     **attending).logits[:, -1]

    run: Callable[[], torch.Tensor] = step
    for index in range(1, max_new_tokens):
        step_mask[:, 0, 0, columns + index - 1] = True
        if filled is not None:
            filled.advance()
        if cuda_graph and first_ids.is_cuda and index == _WARM_UP_STEPS + 1:
            try:
                run = _recorded(step)
            except RuntimeError as error:
                # e.g. a kernel that syncs with the host; recording ran nothing, so go on eagerly
                log.warning("decoding step not recordable as a CUDA graph (%s); this batch decodes eagerly", error)
        next_ids = run().argmax(-1)
        tokens.append(next_ids)
        finished |= torch.isin(next_ids, stops)
        if index % _STOP_CHECK_EVERY == 0 and bool(finished.all()):
            break
        step_ids.copy_(next_ids[:, None])
        step_positions.add_(1)
    return torch.stack(tokens, dim=1)


def _prefill(model, input_ids, lengths: torch.Tensor, cache: StaticCache, chunk_tokens: int) -> torch.Tensor:
    """Last-position logits of every row, and `cache` holding the prompts' keys and values right-aligned in columns
    [0, prompt columns). Each chunk of rows runs its prompts left-aligned, padded on the right with copies of each
    row's last token, which causal attention keeps out of every real position."""
    rows, columns = input_ids.shape
    logits = []
    row_lengths = lengths.tolist()
    for start, end in _row_chunks(row_lengths, chunk_tokens):
        chunk_lengths = lengths[start:end, None]
        width = max(row_lengths[start:end])
        offsets = torch.arange(width, device=input_ids.device)
        left_aligned = input_ids[start:end].gather(1, (columns - chunk_lengths + offsets).clamp(max=columns - 1))
        writer = _RightAligningWriter(model.config, cache, rows, slice(start, end), columns - width,
                                      chunk_lengths[:, 0].to(torch.int32))
        with sdpa_kernel(CAUSAL_SDPA_KERNELS):  # decoding, with its mask, keeps PyTorch's choice (cuDNN on Hopper)
            out = model(input_ids=left_aligned, position_ids=offsets.expand(end - start, -1), cache=writer,
                        logits_to_keep=chunk_lengths - 1)
        logits.append(out.logits[:, -1])
    for layer in cache.layers:
        layer.cumulative_length.fill_(columns)  # decoding writes its first token after the prompt columns
    return torch.cat(logits)


class _RightAligningWriter(DynamicCache):
    """The cache a prefill chunk runs with: each layer's keys and values go straight into the batch's static cache,
    right-aligned from column `first_column` on, and nothing is kept (the chunk attends only to itself, so its
    layers report an empty past)."""

    def __init__(self, config, target: StaticCache, batch_rows: int, rows: slice, first_column: int,
                 lengths: torch.Tensor):
        super().__init__(config=config)
        self.target, self.batch_rows, self.rows, self.first_column, self.lengths = (
            target, batch_rows, rows, first_column, lengths)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        if not self.target.layers[layer_idx].is_initialized:
            self.target.early_initialization(self.batch_rows, key_states.shape[1], key_states.shape[-1],
                                             key_states.dtype, key_states.device)
        layer = self.target.layers[layer_idx]
        for states, cached in ((key_states, layer.keys), (value_states, layer.values)):
            _right_align(states, cached[self.rows], self.lengths, self.first_column)
        return key_states, value_states


def _right_align(states: torch.Tensor, cached: torch.Tensor, lengths: torch.Tensor, first_column: int) -> None:
    """Cache column `first_column + j` takes the row's prompt position `j - (width - length)`; the columns before
    the prompt take position 0 (padding, never attended)."""
    width = states.shape[2]
    if states.is_cuda and _HAS_TRITON and states.stride(-1) == cached.stride(-1) == 1:
        from phi2_assets.ml.speedups.right_aligning_kernel import right_align

        right_align(states, cached, lengths, first_column)
        return
    offsets = torch.arange(width, device=states.device)
    source = (offsets - (width - lengths[:, None])).clamp(min=0)[:, None, :, None].expand_as(states)
    torch.gather(states, 2, source, out=cached[:, :, first_column:first_column + width])


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
