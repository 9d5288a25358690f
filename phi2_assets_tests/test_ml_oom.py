"""Out of GPU memory in training: real `train_lora` runs on the tiny model; the fault enters through the
progress hook, the first thing `train_lora` calls once the LoRA model is built, as a CUDA allocation would."""

import dataclasses

import pytest
import torch

from phi2_assets.ml.oom import TrainingOutOfMemory, halved_micro_batch, train_within_memory
from phi2_assets.ml.train import train_lora
from phi2_assets_tests.test_ml_train import FAST, tiny  # noqa: F401  (the module fixture)


def runner(tiny, tmp_path, fits_at: int, seen: list[int]):  # noqa: F811
    model, tokenizer, train, validation = tiny

    def train_at(settings):
        def progress(line: str) -> None:
            if settings.per_device_batch_size > fits_at:
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

        seen.append(settings.per_device_batch_size)
        run_dir = tmp_path / f"b{settings.per_device_batch_size}"
        return train_lora(model, tokenizer, train, validation, settings, run_dir / "adapter", run_dir / "checkpoints",
                          progress)

    return train_at


def test_retries_at_half_the_micro_batch_with_the_same_effective_batch(tiny, tmp_path):  # noqa: F811
    seen, lines = [], []
    artifact = train_within_memory(runner(tiny, tmp_path, fits_at=1, seen=seen),
                                   dataclasses.replace(FAST, per_device_batch_size=4), True, lines.append)
    assert seen == [4, 2, 1]
    assert artifact.steps == FAST.max_steps
    assert "retrying at 1 x gradient_accumulation_steps=4 (same effective batch of 4)" in lines[-1]
    model = tiny[0]
    assert not any("lora" in name for name, _ in model.named_parameters()), "a failed attempt leaves the base clean"


def test_without_retry_or_room_the_error_names_the_knobs(tiny, tmp_path):  # noqa: F811
    knobs = r"per_device_batch_size=4 x gradient_accumulation_steps=1: lower per_device_batch_size"
    with pytest.raises(TrainingOutOfMemory, match=knobs):
        train_within_memory(runner(tiny, tmp_path, fits_at=0, seen=[]),
                            dataclasses.replace(FAST, per_device_batch_size=4), False, print)
    assert halved_micro_batch(dataclasses.replace(FAST, per_device_batch_size=1)) is None
