"""Kept logits on CPU: TRL's fused LM head keeps the labelled positions' logits for the backward pass on CPU.

What: TRL's chunked log-probability function never holds the `[positions, vocabulary]` logits; its backward pass
recomputes them tile by tile, and where there is no Triton it folds each tile with about a dozen whole-tile torch
ops. On CPU a batch of summaries has about a hundred labelled positions, so their fp32 logits take a few hundred MB
at most. This function computes the same log-probabilities, entropy and top-1 flags in tiles small enough to stay in
cache, keeps the tiles, and turns them into the logits' gradient in place: the backward pass skips the recomputing
matmul and most elementwise passes.
When it pays: fp32 CPU training of a large-vocabulary model (Gemma's 262k words), where the LM head over the
summary tokens is a large part of a step. Elsewhere (CUDA, bf16, a soft-capped or biased head, a trained head,
logits over LOGITS_BUDGET_BYTES) TRL's own function runs.
Knob: `speedups` of the training stage; it replaces TRL's private `_ChunkedLogProbFunction` for the stage's length,
so it runs only on the verified TRL releases.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from phi2_assets.ml.speedups import guards

TILE_COLUMNS = 4_096  # 100 positions x 4,096 fp32 columns stay within a core's L2 cache
LOGITS_BUDGET_BYTES = 1 << 30
COMPUTED_OUTPUTS = frozenset({"log_probs", "entropy", "is_top1"})


class KeptLogitsLogProb(torch.autograd.Function):
    """Per-token log-probabilities of `hidden @ weight.T`, with TRL's `ChunkedLogProbFunction` signature and outputs:
    the entropy and top-1 flags where asked for (`takes` sends calls asking for others to TRL)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, temperature, chunk_size, final_logit_softcapping=None,
                logit_scale=1.0, outputs=()):
        ctx.set_materialize_grads(False)
        positions, vocabulary = hidden.shape[0], weight.shape[0]
        tiles = torch.empty((-(-vocabulary // TILE_COLUMNS), positions, TILE_COLUMNS), dtype=torch.float32)
        running_max = torch.full((positions,), float("-inf"))
        sum_exp, sum_exp_logit = torch.zeros(positions), torch.zeros(positions)
        best, best_index = torch.full((positions,), float("-inf")), torch.zeros(positions, dtype=torch.long)
        for index, start in enumerate(range(0, vocabulary, TILE_COLUMNS)):
            logits = scaled_tile(tiles, index, hidden, weight, start, logit_scale, temperature)
            tile_max, tile_argmax = logits.max(-1)
            better = tile_max > best  # strictly: the first maximum of the vocabulary wins, as argmax's does
            best, best_index = torch.where(better, tile_max, best), torch.where(better, tile_argmax + start, best_index)
            new_max = torch.maximum(running_max, tile_max)
            rescale = torch.exp(running_max - new_max)
            exp_logits = torch.exp(logits - new_max.unsqueeze(-1))
            sum_exp = sum_exp * rescale + exp_logits.sum(-1)
            sum_exp_logit = sum_exp_logit * rescale + exp_logits.mul_(logits).sum(-1)
            running_max = new_max
        log_z = running_max + torch.log(sum_exp)
        rows = torch.arange(positions)
        target_logits = tiles[targets // TILE_COLUMNS, rows, targets % TILE_COLUMNS]
        entropy = log_z - sum_exp_logit / sum_exp
        ctx.save_for_backward(hidden, weight, targets, log_z, entropy, tiles)
        ctx.scales = (logit_scale, 1 / temperature)
        return (target_logits - log_z, entropy if "entropy" in outputs else None, None, None,
                best_index == targets if "is_top1" in outputs else None)

    @staticmethod
    def backward(ctx, grad_logprobs, grad_entropy, *_):
        hidden, weight, targets, log_z, entropy, tiles = ctx.saved_tensors
        grad_hidden = torch.zeros_like(hidden)
        vocabulary = weight.shape[0]
        for index, start in enumerate(range(0, vocabulary, TILE_COLUMNS)):
            width = min(TILE_COLUMNS, vocabulary - start)
            log_probs = tiles[index, :, :width].sub_(log_z.unsqueeze(-1))
            grad = logits_gradient(log_probs, targets - start, entropy, grad_logprobs, grad_entropy)
            grad_hidden.addmm_(grad, weight[start:start + width])
        logit_scale, inverse_temperature = ctx.scales
        return grad_hidden * inverse_temperature * logit_scale, None, None, None, None, None, None, None, None


def scaled_tile(tiles, index, hidden, weight, start, logit_scale, temperature) -> torch.Tensor:
    """Tile `index` of the logits, written into `tiles` and scaled as TRL scales them (scale, then 1/temperature)."""
    width = min(TILE_COLUMNS, weight.shape[0] - start)
    logits = tiles[index, :, :width]
    torch.mm(hidden, weight[start:start + width].t(), out=logits)
    if logit_scale != 1.0:
        logits.mul_(logit_scale)
    if temperature != 1.0:
        logits.mul_(1 / temperature)
    return logits


def logits_gradient(log_probs, local_targets, entropy, grad_logprobs, grad_entropy) -> torch.Tensor:
    """d(loss)/d(logits) of one tile, in the tile's memory: `grad_logprobs * (onehot - p)` minus
    `grad_entropy * p * (log p + entropy)`, as TRL's backward computes it."""
    entropy_term = None
    if grad_entropy is not None:
        entropy_term = grad_entropy.unsqueeze(-1) * (log_probs + entropy.unsqueeze(-1))
    probs = log_probs.exp_()
    if entropy_term is not None:
        entropy_term.mul_(probs)
    if grad_logprobs is None:
        probs.zero_()
    else:
        probs.mul_(-grad_logprobs.unsqueeze(-1))
        inside = ((local_targets >= 0) & (local_targets < probs.shape[1])).nonzero().squeeze(-1)
        probs[inside, local_targets[inside]] += grad_logprobs[inside]
    return probs if entropy_term is None else probs.sub_(entropy_term)


def takes(hidden, weight, bias, final_logit_softcapping, outputs) -> bool:
    """Whether this call suits the kept logits: fp32 on CPU, a plain frozen head, logits within the budget, and
    only the outputs computed here asked for."""
    return (COMPUTED_OUTPUTS.issuperset(outputs) and hidden.device.type == "cpu"
            and hidden.dtype == weight.dtype == torch.float32 and bias is None and final_logit_softcapping is None
            and not weight.requires_grad and not torch.is_autocast_enabled("cpu")
            and hidden.shape[0] * weight.shape[0] * 4 <= LOGITS_BUDGET_BYTES)


class _Dispatch:
    """Stands in for TRL's class where TRL's fused head calls `.apply`: kept logits where they suit, else TRL's."""

    def __init__(self, chunked):
        self.chunked = chunked

    def apply(self, hidden, weight, bias, targets, temperature, chunk_size, final_logit_softcapping=None,
              logit_scale=1.0, outputs=()):
        kept = takes(hidden, weight, bias, final_logit_softcapping, outputs)
        function = KeptLogitsLogProb if kept else self.chunked
        return function.apply(hidden, weight, bias, targets, temperature, chunk_size, final_logit_softcapping,
                              logit_scale, outputs)


@contextlib.contextmanager
def applied() -> Iterator[None]:
    import trl.trainer.utils as trl_utils

    chunked = getattr(trl_utils, "_ChunkedLogProbFunction", None)
    if chunked is None or not guards.requires("kept_logits_cpu", trl=guards.TRL):
        yield
        return
    trl_utils._ChunkedLogProbFunction = _Dispatch(chunked)
    try:
        yield
    finally:
        trl_utils._ChunkedLogProbFunction = chunked
