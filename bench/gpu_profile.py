"""Where the phi2 profile's time goes on a CUDA GPU: a profiled training step and a profiled generation run.

The same model and data as bench/gpu_benchmark.py (phi-2-shaped random weights in 4-bit NF4), trained by
`train.train_lora` with the profile's recipe and sampled by `generate.generate_summaries` on the merged bf16 copy.
Per part: wall time against summed GPU kernel time (how far the GPU is kept busy), kernel time by kind (matmul,
attention, NF4 dequantisation, the rest), and the top kernels. Optional trials time recipe variants side by side.

On a CUDA machine, from the repository root with the project's dependencies installed:

    PYTHONPATH=. python bench/gpu_profile.py [--profile-recipes best best_compiled] [--python-profile]
        [--trials best best_compiled best_compiled_stock_trainer best_compiled_cpp_wrapper ...]
        [--generation-trials] [--skip-generation-profile] [--generation-only] [--output-dir data/bench]

Writes <output-dir>/h200-profile.json after every part.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import cProfile
import dataclasses
import json
import pstats
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from bench import gpu_benchmark as bench
from bench import gpu_metrics
from bench.phi2_shape import synthetic_articles
from phi2_assets.ml import generate
from phi2_assets.ml.train import train_lora
from phi2_assets.profiles import PROFILES

PROFILED_STEPS = (3, 5)  # training steps [first, last): after the warm-up steps, before the end
GENERATION_ARTICLES = 200
KINDS = (  # kernel name fragments, first match wins
    ("nf4_dequantize", ("dequantize", "kdequant")),
    ("attention", ("fmha", "flash", "attention", "cudnn", "sdpa")),
    ("matmul", ("gemm", "gemv", "nvjet", "xmma", "cutlass", "sm90_", "splitk")),
    ("optimizer", ("optimizer", "adam")),  # bitsandbytes' 8-bit AdamW kernels
)
PAGED_8BIT = {"optimizer": "paged_adamw_8bit"}  # the seed's optimizer: bitsandbytes launches a kernel per LoRA tensor
TRIALS = {  # name: (settings, attention implementation, SDPA kernels or None for PyTorch's choice)
    "best": (bench.RECIPES["best"], "sdpa", None),
    "best_compiled": (bench.RECIPES["best_compiled"], "sdpa", None),
    # each batch shape's forward and backward pass replayed as a CUDA graph (steps of a new shape are captures)
    "best_graphed": (bench.RECIPES["best_graphed"], "sdpa", None),
    "best_compiled_dynamic_padding": (bench.RECIPES["best_compiled_dynamic_padding"], "sdpa", None),
    "best_compiled_8bit_adamw": (dataclasses.replace(bench.RECIPES["best_compiled"], **PAGED_8BIT), "sdpa", None),
    # the phi2 recipe with the seed's paged AdamW 8-bit
    "best_8bit_adamw": (dataclasses.replace(bench.RECIPES["best"], **PAGED_8BIT), "sdpa", None),
    "lean": (bench.RECIPES["lean"], "sdpa", None),
    "best_dynamic_padding": (bench.RECIPES["dynamic_padding"], "sdpa", None),
    "no_lora_dropout": (dataclasses.replace(bench.RECIPES["best"], lora_dropout=0.0), "sdpa", None),
    "flex_padding_free": (bench.RECIPES["padding_free"], "flex_attention", None),
    # batches fetched and collated by the training process between steps, as before the profile's two workers
    "best_without_workers": (dataclasses.replace(bench.RECIPES["best"], dataloader_workers=0), "sdpa", None),
    "best_compiled_without_workers": (
        dataclasses.replace(bench.RECIPES["best_compiled"], dataloader_workers=0),
        "sdpa",
        None,
    ),
}
# "best_compiled" + this: the compiled layers replayed as CUDA graphs (mode reduce-overhead); fails in torch 2.11
# ("accessing tensor output of CUDAGraphs that has been overwritten by a subsequent run")
GRAPHED = "_graphs"
# any recipe + this: TRL's own SFTTrainer and the model's own train() and zero_grad(), without `lean_steps`
STOCK_TRAINER = "_stock_trainer"
# a compiled recipe + this: Inductor writes each graph's launching code in C++ instead of Python
CPP_WRAPPER = "_cpp_wrapper"
# any recipe + this: the lean trainer with TRL's own compute_loss, which reads its metrics with `.item()` per batch
TRL_LOSS = "_trl_loss"
VARIANTS = (GRAPHED, STOCK_TRAINER, CPP_WRAPPER, TRL_LOSS)
COMPILE_ARGUMENTS = {GRAPHED: {"mode": "reduce-overhead"}, CPP_WRAPPER: {"options": {"cpp_wrapper": True}}}
# host-side phases of a training step, annotated while profiling: (class path, method) -> label
HOST_PHASES = {
    ("transformers.Trainer", "get_batch_samples"): "host: next batch",
    ("trl.SFTTrainer", "compute_loss"): "host: forward + loss + TRL metrics",
    ("accelerate.Accelerator", "backward"): "host: backward",
    ("transformers.Trainer", "_clip_grad_norm"): "host: clip grad norm",
    ("transformers.Trainer", "_maybe_log_save_evaluate"): "host: log",
}
# where the host waits for the GPU (`.item()` and friends)
SYNC_OPS = ("aten::_local_scalar_dense", "cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaMemcpyAsync")
report: dict = {}


@contextlib.contextmanager
def annotated_host_phases():
    """Each HOST_PHASES method runs inside a profiler range of its label (the optimizer annotates its own step)."""
    import importlib

    originals = []
    for (owner_path, method), label in HOST_PHASES.items():
        module, _, name = owner_path.rpartition(".")
        owner = getattr(importlib.import_module(module), name)
        original = getattr(owner, method)

        def wrapped(*args, _original=original, _label=label, **kwargs):
            with record_function(_label):
                return _original(*args, **kwargs)

        originals.append((owner, method, original))
        setattr(owner, method, wrapped)
    try:
        yield
    finally:
        for owner, method, original in originals:
            setattr(owner, method, original)


def kind_of(kernel: str) -> str:
    name = kernel.lower()
    return next((kind for kind, parts in KINDS if any(part in name for part in parts)), "elementwise/other")


def summarise(prof, wall_s: float, units: int, label: str) -> dict:
    """Kernel time per unit (a step or a run) by kind and by kernel, against wall time per unit."""
    per_kernel: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0])
    for event in prof.events():
        # kernels only: a user annotation's GPU-side range (Optimizer.step#AdamW.step) spans kernels counted already
        if event.device_type == torch.autograd.DeviceType.CUDA and not event.is_user_annotation:
            entry = per_kernel[event.name]
            entry[0] += event.time_range.elapsed_us() / 1e3
            entry[1] += 1
    busy = sum(ms for ms, _ in per_kernel.values())
    kinds: dict[str, float] = collections.Counter()
    for name, (ms, _) in per_kernel.items():
        kinds[kind_of(name)] += ms
    top = sorted(per_kernel.items(), key=lambda item: -item[1][0])[:25]
    host: dict[str, float] = collections.Counter()
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CPU and (
            event.name.startswith(("host: ", "Optimizer.step")) or event.name in SYNC_OPS
        ):
            host[event.name] += event.cpu_time_total / 1e3
    result = {
        "wall_ms": round(wall_s * 1e3 / units, 1),
        "gpu_busy_ms": round(busy / units, 1),
        "gpu_busy_share": round(busy / (wall_s * 1e3), 3),
        "kernels_launched": int(sum(count for _, count in per_kernel.values()) / units),
        "by_kind_ms": {kind: round(ms / units, 1) for kind, ms in sorted(kinds.items(), key=lambda kv: -kv[1])},
        "host_ms": {name: round(ms / units, 1) for name, ms in sorted(host.items(), key=lambda kv: -kv[1])},
        "top_kernels": [
            {"ms": round(ms / units, 2), "calls": int(count / units), "name": name[:110]} for name, (ms, count) in top
        ],
    }
    print(
        f"\n=== {label}: wall {result['wall_ms']} ms, GPU busy {result['gpu_busy_ms']} ms"
        f" ({result['gpu_busy_share']:.0%}),"
        f" {result['kernels_launched']} kernels per unit",
        flush=True,
    )
    print("by kind (ms):", json.dumps(result["by_kind_ms"]))
    print("host (ms):", json.dumps(result["host_ms"]))
    for row in result["top_kernels"][:18]:
        print(f"{row['ms']:9.2f} ms {row['calls']:6d}x  {row['name']}")
    ops = prof.key_averages().table(sort_by="self_device_time_total", row_limit=18, max_name_column_width=48)
    print(ops, flush=True)
    return result


def print_python_profile(python_profile: cProfile.Profile, units: int) -> None:
    """The Python functions that hold the host longest, per training step: own time, and time with callees."""
    stats = pstats.Stats(python_profile)
    rows = [
        (own / units, cumulative / units, calls // units, f"{'/'.join(Path(file).parts[-2:])}:{line}({name})")
        for (file, line, name), (_, calls, own, cumulative, _) in stats.stats.items()
    ]
    report["python_ms_per_step"] = {}
    for label, index in (("own", 0), ("with callees", 1)):
        top = sorted(rows, key=lambda row: -row[index])[:30]
        report["python_ms_per_step"][label] = [
            [round(own * 1e3, 2), round(cum * 1e3, 2), calls, where] for own, cum, calls, where in top
        ]
        print(f"\n=== Python, ms per step by {label} time (own, with callees, calls, function)")
        for own, cum, calls, where in top:
            print(f"{own * 1e3:8.2f} {cum * 1e3:8.2f} {calls:6d}  {where}")
    # who calls the host's busiest primitives (counts and times over all profiled steps)
    stats.sort_stats("tottime").print_callers(r"method 'item'|named_modules|torch\.mm>|_empty_strided_cuda")


def profile_training(recipe: str, model, tokenizer, train, evaluation, python: bool = False) -> None:
    """`train_lora` with a trial's recipe (the profile's by default); steps PROFILED_STEPS of
    SFTTrainer.training_step are recorded by torch's profiler, or with `python` by cProfile (Python's own time
    per function, with no kernel view)."""
    from trl import SFTTrainer

    original = SFTTrainer.training_step
    python_profile = cProfile.Profile() if python else None
    prof = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA])
    calls, started = [0], [0.0]
    first, last = PROFILED_STEPS

    def training_step(self, *args, **kwargs):
        # the window runs from training step `first` to the start of step `last`: whole steps, each with its
        # optimizer step, logging and next batch
        calls[0] += 1
        if calls[0] in (first, last):
            torch.cuda.synchronize()
            if calls[0] == first:
                python_profile.enable() if python_profile else prof.start()
                started[0] = time.perf_counter()
            elif python_profile:
                python_profile.disable()
                report.setdefault("python_profiled_step_ms", {})[recipe] = round(
                    (time.perf_counter() - started[0]) * 1e3 / (last - first), 1
                )
                print_python_profile(python_profile, last - first)
            else:
                wall = time.perf_counter() - started[0]
                prof.stop()
                report.setdefault("training_step", {})[recipe] = summarise(
                    prof, wall, last - first, f"training step, {recipe} (16 x ~484 tokens)"
                )
        return original(self, *args, **kwargs)

    SFTTrainer.training_step = training_step
    try:
        with annotated_host_phases():
            settings = dataclasses.replace(TRIALS[recipe][0], max_steps=last + 1)
            train_lora(
                model,
                tokenizer,
                train,
                evaluation,
                settings,
                bench.WORK / "adapter-profiled",
                bench.WORK / "checkpoints",
            )
    finally:
        SFTTrainer.training_step = original


@contextlib.contextmanager
def stock_trainer(enabled: bool):
    """`train_lora` with every speed-up but `lean_steps`: TRL's own SFTTrainer, the model's own `train()` and
    `zero_grad()`."""
    if not enabled:
        yield
        return
    from phi2_assets.ml.speedups import lean_steps

    available = lean_steps.available
    lean_steps.available = lambda: False
    try:
        yield
    finally:
        lean_steps.available = available


@contextlib.contextmanager
def trl_loss(enabled: bool):
    """The lean trainer computing its loss with TRL's `SFTTrainer.compute_loss`."""
    if not enabled:
        yield
        return
    from trl import SFTTrainer

    from phi2_assets.ml.speedups.lean_steps import LeanStepSFTTrainer

    lean = LeanStepSFTTrainer.compute_loss
    LeanStepSFTTrainer.compute_loss = SFTTrainer.compute_loss
    try:
        yield
    finally:
        LeanStepSFTTrainer.compute_loss = lean


@contextlib.contextmanager
def compile_arguments(arguments: dict | None):
    """`compile_layers` passes these to torch.compile besides its own."""
    if arguments is None:
        yield
        return
    from torch import nn
    from transformers.modeling_layers import GradientCheckpointingLayer

    GradientCheckpointingLayer.compile = lambda self, **kwargs: nn.Module.compile(self, **arguments, **kwargs)
    try:
        yield
    finally:
        del GradientCheckpointingLayer.compile


def trial(name: str, model, tokenizer, train, evaluation, flops_per_token: float) -> None:
    base = next((name.removesuffix(suffix) for suffix in VARIANTS if name.endswith(suffix)), name)
    settings, attention, backends = TRIALS[base]
    model.set_attn_implementation(attention)
    try:
        with (
            bench.sdpa_backends(backends),
            compile_arguments(COMPILE_ARGUMENTS.get(name.removeprefix(base))),
            stock_trainer(name.endswith(STOCK_TRAINER)),
            trl_loss(name.endswith(TRL_LOSS)),
        ):
            result = bench.train_recipe(name, settings, model, tokenizer, train, evaluation, flops_per_token)
    finally:
        model.set_attn_implementation("sdpa")
    keys = (
        "tok_s",
        "tok_s_end_to_end",
        "first_log_s",
        "train_seconds",
        "mfu",
        "peak_mem_gib",
        "train_losses",
        "eval_loss_after",
    )
    entry = {"trial": name, **{k: result[k] for k in keys}}
    report.setdefault("trials", []).append(entry)
    print(f"[trial] {entry}", flush=True)


def profile_generation(merged, tokenizer, articles: list[str]) -> None:
    settings = PROFILES["phi2"].generation
    for label, options in (
        ("generation prefill only (1 new token)", {"max_new_tokens": 1}),
        ("generation, 60 new tokens", {}),
    ):
        chosen = dataclasses.replace(settings, **options)
        generate.generate_summaries(merged, tokenizer, articles[:8], chosen)  # first-call costs out of the profile
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            started = time.perf_counter()
            result = generate.generate_summaries(merged, tokenizer, articles, chosen)
            torch.cuda.synchronize()
            wall = time.perf_counter() - started
        key = "generation_prefill" if options else "generation"
        report[key] = {
            "batch_size": result.batch_size,
            "summaries": len(result.records),
            **summarise(prof, wall, 1, label),
        }


def generation_trials(merged, tokenizer, articles: list[str], rounds: int = 2) -> None:
    """The profile's generation with PyTorch's SDPA choice and without cuDNN, alternating (the first generation
    after a load pays one-time costs; a warm-up absorbs most of them)."""
    settings = PROFILES["phi2"].generation
    generate.generate_summaries(merged, tokenizer, articles[:8], settings)
    for label in ("pytorch_choice", "without_cudnn") * rounds:

        def run(label=label):
            with bench.sdpa_backends(bench.WITHOUT_CUDNN if label == "without_cudnn" else None):
                result = generate.generate_summaries(merged, tokenizer, articles, settings)
            entry = {
                "sdpa": label,
                "per_s": round(result.summaries_per_second, 1),
                "seconds": round(result.seconds, 2),
                "batches": result.batch_sizes,
                "nonempty": result.success_rate,
            }
            report.setdefault("generation_trials", []).append(entry)
            print(f"[generation] {entry}", flush=True)

        bench.phase(f"generation {label}", 60, run)


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--profile-recipes",
        nargs="*",
        default=["best"],
        choices=list(TRIALS),
        help="recipes whose training steps are profiled, in turn",
    )
    parser.add_argument(
        "--python-profile",
        action="store_true",
        help="profile the training steps with cProfile (Python functions) instead of torch's profiler",
    )
    compiled = [name for name in TRIALS if TRIALS[name][0].compile_layers]
    trial_names = (
        list(TRIALS)
        + ["best_compiled" + GRAPHED]
        + [name + STOCK_TRAINER for name in TRIALS]
        + [name + TRL_LOSS for name in TRIALS]
        + [name + CPP_WRAPPER for name in compiled]
    )
    parser.add_argument(
        "--trials",
        nargs="*",
        default=[],
        choices=trial_names,
        help="recipe variants to time after the profile (repeat names to alternate)",
    )
    parser.add_argument(
        "--generation-trials",
        action="store_true",
        help="time 500 summaries with PyTorch's attention kernel and without cuDNN",
    )
    parser.add_argument("--skip-generation-profile", action="store_true")
    parser.add_argument(
        "--generation-only",
        action="store_true",
        help="profile generation alone, on the merged model without an adapter",
    )
    gpu_metrics.add_common_arguments(parser)
    return parser.parse_args()


def main() -> None:
    args = parse_arguments()
    bench.OUTPUT_DIR = args.output_dir
    report["commit"] = gpu_metrics.commit(args.commit)

    def save() -> None:
        report["errors"] = bench.details.get("errors")
        report["phase_seconds"] = bench.details.get("phase_seconds")
        (args.output_dir / "h200-profile.json").write_text(json.dumps(report, indent=1))

    bench.after_phase = save
    # trials compile the decoder layers' one code object in several variants (kernels, modes) in one process
    torch._dynamo.config.recompile_limit = 32
    if not args.generation_only:
        profile_and_time_training(args)
        bench.free_memory()  # the 4-bit model, before the merged copy loads
    if args.skip_generation_profile and not args.generation_trials:
        return
    spec, model_dir, tokenizer = bench.phi2_shape_checkpoint()
    adapter = bench.WORK / "adapter-profiled"
    merged = generate.load_merged_bf16(spec, model_dir, adapter if adapter.is_dir() else None)
    articles = synthetic_articles(GENERATION_ARTICLES)
    if not args.skip_generation_profile:
        bench.phase("profile generation", 200, lambda: profile_generation(merged, tokenizer, articles))
    if args.generation_trials:
        generation_trials(merged, tokenizer, synthetic_articles(bench.MERGED_ARTICLES))


def profile_and_time_training(args: argparse.Namespace) -> None:
    """The training profiles and trials on the 4-bit model, which goes when this returns."""
    inputs = bench.load_inputs()
    for recipe in args.profile_recipes:
        bench.phase(
            f"profile training {recipe}",
            300,
            lambda recipe=recipe: profile_training(
                recipe, inputs.model, inputs.tokenizer, inputs.train, inputs.evaluation, args.python_profile
            ),
        )
    for name in args.trials:
        bench.phase(
            f"trial {name}",
            200,
            lambda name=name: trial(
                name, inputs.model, inputs.tokenizer, inputs.train, inputs.evaluation, inputs.flops_per_token
            ),
        )


if __name__ == "__main__":
    main()
