"""Sorted evaluation: the held-out rows cut into batches in order of length, longest first, at every evaluation.

What: with length-grouped training, Trainer also evaluates through its length-grouped sampler, which shuffles the
rows and sorts them only within "megabatches" of min(50, rows / (4 x batch)) batches; at 500 rows and 64 per batch
that is one batch, so evaluation batches are random and mostly padding. `with_sorted_evaluation` gives a trainer
class whose evaluation sampler sorts all held-out rows by length instead: the fewest padded tokens any batching
can have, the same batches at every evaluation, the longest first so that an out-of-memory shows at once.
When it pays: wherever evaluation batches are large against the held-out set (the phi2 profile evaluates 500 rows
nine times), and most on a GPU, where a batch of 64 then costs little more than its tokens.
Knob: `speedups` of the training stage. It overrides Trainer's private `_get_eval_sampler`, so it runs only on the
verified transformers release, in one process (a launched run keeps the stock sampler, which Accelerate shards).
Trainer's eval loss is a mean of per-batch losses, so other batches weigh the rows' tokens slightly differently;
with one batch holding every row it is the stock trainer's.
"""

from __future__ import annotations

import functools

from torch.utils.data import Sampler
from transformers import Trainer

from phi2_assets.ml.speedups import guards


def available() -> bool:
    return guards.requires("sorted_evaluation", transformers=guards.TRANSFORMERS) and hasattr(
        Trainer, "_get_eval_sampler")


class LongestFirstSampler(Sampler[int]):
    """Every row index once, in order of length, longest first (ties in row order)."""

    def __init__(self, lengths: list[int]):
        self.order = sorted(range(len(lengths)), key=lambda index: -lengths[index])

    def __iter__(self):
        return iter(self.order)

    def __len__(self) -> int:
        return len(self.order)


class _SortedEvaluation:
    """Trainer mixin: evaluation through `LongestFirstSampler` when training groups by length in one process."""

    def _get_eval_sampler(self, eval_dataset):
        grouped = self.args.train_sampling_strategy == "group_by_length"
        if not grouped or self.args.world_size > 1 or "input_ids" not in getattr(eval_dataset, "column_names", ()):
            return super()._get_eval_sampler(eval_dataset)
        return LongestFirstSampler([len(ids) for ids in eval_dataset["input_ids"]])


@functools.cache
def with_sorted_evaluation(trainer_class: type[Trainer]) -> type[Trainer]:
    """`trainer_class` evaluating in sorted batches (one class per base, so checkpoints and logs name it stably)."""
    return type(f"SortedEvaluation{trainer_class.__name__}", (_SortedEvaluation, trainer_class), {})
