"""Running out of GPU memory in training: retry at half the micro-batch with double the gradient accumulation
(the same effective batch, so the same recipe), and when that is not possible, one message naming the knobs."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TypeVar

import torch

from phi2_assets.ml.train import TrainSettings

Result = TypeVar("Result")
KNOBS = (
    "lower per_device_batch_size (raise gradient_accumulation_steps to keep the effective batch), "
    "turn gradient_checkpointing on, or lower tokenized_xsum's max_length"
)


class TrainingOutOfMemory(RuntimeError):
    """Training did not fit in GPU memory even at the smallest micro-batch tried."""


def halved_micro_batch(settings: TrainSettings) -> TrainSettings | None:
    """Half the micro-batch, double the accumulation; None when the micro-batch is already 1."""
    if settings.per_device_batch_size == 1:
        return None
    return dataclasses.replace(
        settings,
        per_device_batch_size=settings.per_device_batch_size // 2,
        gradient_accumulation_steps=settings.gradient_accumulation_steps * 2,
    )


def train_within_memory(train: Callable[[TrainSettings], Result], settings: TrainSettings, retry: bool,
                        say: Callable[[str], None]) -> Result:
    """`train(settings)`, halving the micro-batch after each out-of-memory error while `retry` allows and it can."""
    while True:
        try:
            return train(settings)
        except torch.OutOfMemoryError as error:
            smaller = halved_micro_batch(settings) if retry else None
            if smaller is None:
                raise TrainingOutOfMemory(
                    f"out of GPU memory training at per_device_batch_size={settings.per_device_batch_size} x "
                    f"gradient_accumulation_steps={settings.gradient_accumulation_steps}: {KNOBS}"
                ) from error
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            say(
                f"out of GPU memory at per_device_batch_size={settings.per_device_batch_size}: retrying at "
                f"{smaller.per_device_batch_size} x gradient_accumulation_steps={smaller.gradient_accumulation_steps} "
                f"(same effective batch of {smaller.per_device_batch_size * smaller.gradient_accumulation_steps})"
            )
            settings = smaller
