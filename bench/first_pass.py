"""What a process's first generation pays once: the `phi2` profile's generation path on the phi-2-shaped model (bf16,
no adapter), several passes over the same 500 prompts in one process, each with its time per batch and the Triton
kernels it compiled (the new entries in Triton's on-disk cache), and how long each kernel compiled ahead took and
how long generation waited for it.

On a CUDA machine, from the repository root with the project's dependencies installed:

    TRITON_CACHE_DIR=$(mktemp -d) PYTHONPATH=. python bench/first_pass.py --label cold [--passes 2]
        [--without kernels_ahead|merged_bf16_separate_gelu|...] [--reserve-budget | --busy-seconds 1]
        [--output-dir data/bench]

A second process with the same TRITON_CACHE_DIR finds every kernel compiled, as a machine's second generation run
does. `--reserve-budget` has PyTorch's allocator take the batch planner's memory budget after the load and free
it again, so the first batch's cache finds it reserved; `--busy-seconds` keeps the GPU computing that
long after the load, so the first batch meets its clocks raised. Appends one entry per process to
<output-dir>/h200-first-pass.json.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import time
import unittest.mock
from pathlib import Path

import torch

from bench import gpu_benchmark as bench
from bench import gpu_metrics
from bench.phi2_shape import synthetic_articles
from phi2_assets.ml import generate
from phi2_assets.ml.speedups import batch_planning, kernels_ahead
from phi2_assets.profiles import PROFILES


def cache_entries() -> int:
    """Kernels in Triton's on-disk cache (one folder each)."""
    folder = Path(os.environ.get("TRITON_CACHE_DIR") or Path.home() / ".triton" / "cache")
    return sum(1 for entry in folder.iterdir() if entry.is_dir()) if folder.is_dir() else 0


def timed_pass(model, tokenizer, articles: list[str]) -> dict:
    before = cache_entries()
    result = generate.generate_summaries(model, tokenizer, articles, PROFILES["phi2"].generation)
    return {"per_s": round(result.summaries_per_second, 1), "seconds": round(result.seconds, 3),
            "batches": result.batch_sizes, "batch_seconds": [round(s, 3) for s in result.batch_seconds],
            "outside_batches_seconds": round(result.seconds - sum(result.batch_seconds), 3),
            "nonempty_rate": result.success_rate, "kernels_compiled": cache_entries() - before,
            "reserved_gib": gpu_metrics.gib(torch.cuda.memory_reserved())}


def reserve(model) -> float:
    """Seconds PyTorch's allocator took to reserve the batch planner's memory budget (kept cached once freed)."""
    started = time.perf_counter()
    block = torch.empty(batch_planning.generation_memory_budget(model), dtype=torch.uint8, device=model.device)
    del block
    torch.cuda.synchronize()
    return round(time.perf_counter() - started, 3)


def keep_busy(seconds: float) -> int:
    """Matmuls of 8192-cubes, one after another for about `seconds`; how many ran."""
    a = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    runs, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        for _ in range(10):
            a @ a
        runs += 10
        torch.cuda.synchronize()
    return runs


def without(name: str | None):
    """The benchmark's patch for that variant, or one that keeps kernels from compiling ahead."""
    if name == "kernels_ahead":
        return unittest.mock.patch.object(kernels_ahead, "start", lambda config, dtype: None)
    return unittest.mock.patch.object(*bench.PATCHED_GENERATION_VARIANTS[name]) if name else contextlib.nullcontext()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--label", required=True, help="the name of this process's entry")
    parser.add_argument("--passes", type=int, default=2)
    parser.add_argument("--without", choices=[*bench.PATCHED_GENERATION_VARIANTS, "kernels_ahead"], default=None,
                        help="one generation speed-up turned off, as the benchmark's variant of that name, or the "
                             "kernels compiled while the model loads")
    parser.add_argument("--reserve-budget", action="store_true",
                        help="reserve the batch planner's memory budget in PyTorch's allocator after the load")
    parser.add_argument("--busy-seconds", type=float, default=None,
                        help="keep the GPU computing this long after the load")
    gpu_metrics.add_common_arguments(parser)
    args = parser.parse_args()
    bench.OUTPUT_DIR = args.output_dir
    spec, model_dir, tokenizer = bench.phi2_shape_checkpoint()
    articles = synthetic_articles(bench.MERGED_ARTICLES)
    entry = {"label": args.label, "commit": gpu_metrics.commit(args.commit), "without": args.without,
             "reserve_budget": args.reserve_budget, "busy_seconds": args.busy_seconds,
             "cached_kernels_at_start": cache_entries()}
    with without(args.without):
        started = time.perf_counter()
        model = generate.load_merged_bf16(dataclasses.replace(spec, load_in_4bit=False), model_dir, None)
        torch.cuda.synchronize()
        entry["load_seconds"] = round(time.perf_counter() - started, 1)
        if args.reserve_budget:
            entry["reserve_seconds"] = reserve(model)
        if args.busy_seconds:
            entry["busy_matmuls"] = keep_busy(args.busy_seconds)
        entry["passes"] = [timed_pass(model, tokenizer, articles) for _ in range(args.passes)]
    entry["kernels_ahead_seconds"] = kernels_ahead.seconds()
    print(json.dumps(entry), flush=True)
    output = args.output_dir / "h200-first-pass.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    entries = json.loads(output.read_text()) if output.exists() else []
    output.write_text(json.dumps([*entries, entry], indent=1))


if __name__ == "__main__":
    main()
