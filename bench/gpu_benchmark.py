"""Training and generation speed of the phi2 profile's recipe on one CUDA GPU, through the project's own code.

A Phi-2-shaped model with random weights (bench/phi2_shape.py) is saved as safetensors and loaded by
`models.load_model` in 4-bit NF4, trained by `train.train_lora` and sampled by `generate.generate_summaries`
(4-bit + LoRA through `models.adapted`, the adapter merged into bf16 through `generate.load_merged_bf16`).
Every recipe trains on the same XSum-shaped token rows for the same 16 optimizer steps of 16 sequences (`--steps`;
375 is the phi2 profile's run, where graphed steps capture each batch shape once); tokens/s is measured after the
first progress line (4 steps) and MFU counts useful FLOPs (bench/gpu_metrics.py) against 790 TFLOP/s. Recipes:
`best`, the phi2 profile's; `stock`, the same batch and layout with `speedups: false` (TRL and transformers as
shipped); `seed`, the seed notebooks' recipe; compiled, padding, memory-capped and one-speed-up-off variants.
Evaluation: the profile's recipe evaluated on 500 held-out rows at each `--evaluation-batches` size, in batches
sorted by length against Trainer's length-grouped ones. Generation: the profile's path first (its first pass is the
first generation in the process, 500 prompts, as an evaluation step meets it), then variants, the 4-bit + LoRA
path, and how far each path's summaries agree.

On a CUDA machine, from the repository root with the project's dependencies installed:

    PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True PYTHONPATH=. python bench/gpu_benchmark.py
        [--recipes best stock seed lean ...] [--steps 16] [--evaluation-batches 16 64] [--skip-generation]
        [--pipeline-json data/bench/pipeline.json]
        [--output-dir data/bench] [--commit SHA]

Writes <output-dir>/h200.json (the headline figures, with the commit and `pipeline_seconds` from
bench/gpu_pipeline.py's results when given) and <output-dir>/h200-details.json after every part, and prints tables
last. BENCH_DIR (default: the system's temporary directory) holds the checkpoint and the adapters.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import json
import logging
import os
import re
import signal
import tempfile
import time
import traceback
import unittest.mock
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from bench import gpu_metrics
from bench.phi2_shape import (
    EOS_ID,
    save_phi2_shape,
    synthetic_articles,
    synthetic_tokenized_xsum,
)
from phi2_assets.ml import generate, models
from phi2_assets.ml.speedups import (
    decoded_nf4,
    filled_columns,
    fused_qkv,
    fused_rotary,
    gelu_epilogue,
    graphed_steps,
    lean_lora,
    sorted_evaluation,
    static_decoding,
)
from phi2_assets.ml.train import (
    TrainSettings,
    expected_trainable_parameters,
    target_modules_for,
    train_lora,
)
from phi2_assets.profiles import PROFILES

if TYPE_CHECKING:
    import datasets
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

WORK = Path(os.environ.get("BENCH_DIR") or Path(tempfile.gettempdir()) / "phi2-bench")
OUTPUT_DIR = gpu_metrics.DEFAULT_OUTPUT_DIR  # set from --output-dir by each benchmark's main
STEPS = 16  # optimizer steps per recipe, 16 sequences each (8 left identical recipes 30% apart)
EFFECTIVE_BATCH = 16
LEAN_CARD_GIB = 15.0  # what a 16 GB card (T4) leaves to PyTorch's allocator
SEQUENTIAL_ARTICLES, UNMERGED_ARTICLES, MERGED_ARTICLES = 3, 256, 500
EVALUATION_ROWS = 500  # held-out rows the evaluation phases time, as many as the phi2 profile's validation rows
PROGRESS = re.compile(r"step (\d+)/(\d+)\s+loss ([\d.]+).*?([\d,]+) tokens/s")

LOGGED_EVERY = 4  # steps between progress lines: each reads the token count, a wait for the GPU (the profile: 10)
BENCH_RUN = {"max_steps": STEPS, "logging_steps": LOGGED_EVERY, "save_steps": 100_000, "eval_steps": None}
# the seed notebooks' recipe (TrainSettings' defaults): micro-batch 2 x grad-accum 8, dynamic padding, paged AdamW
# 8-bit, gradient checkpointing, bf16 autocast, on TRL and transformers as shipped
SEED = dataclasses.replace(TrainSettings(), speedups=False, **BENCH_RUN)
# the phi2 profile's: 16 x 1, length-grouped, padded to a multiple of 64, no checkpointing, fused AdamW, two workers
BEST = dataclasses.replace(PROFILES["phi2"].train, **BENCH_RUN)
RECIPES: dict[str, TrainSettings] = {
    "seed": SEED,
    "best": BEST,
    # the phi2 recipe once more in the same process: the spread between two runs of one recipe
    "best_again": BEST,
    # the phi2 recipe with its decoder layers compiled (the compile lands in the warm-up)
    "best_compiled": dataclasses.replace(BEST, compile_layers=True),
    # the same padded to each batch's longest row: compiled for dynamic shapes, a new length costs no new compile
    "best_compiled_dynamic_padding": dataclasses.replace(BEST, compile_layers=True, pad_to_multiple_of=None),
    # the phi2 recipe with each batch shape's forward and backward pass replayed as a CUDA graph
    "best_graphed": dataclasses.replace(BEST, cuda_graph=True),
    # the phi2 recipe without dropout on the LoRA input (six adapters per layer)
    "best_without_lora_dropout": dataclasses.replace(BEST, lora_dropout=0.0),
    # the same dropout drawn inside the adapters' first matmul, eager and graphed
    "best_with_lora_dropout_kernel": dataclasses.replace(BEST, lora_dropout_kernel=True),
    "best_graphed_with_lora_dropout_kernel": dataclasses.replace(BEST, cuda_graph=True, lora_dropout_kernel=True),
    # the phi2 profile's recipe with activation checkpointing, under a 16 GB card's memory limit
    "lean": dataclasses.replace(BEST, gradient_checkpointing=True),
    # the phi2 recipe padded to each batch's longest row: nearly every step a new shape
    "dynamic_padding": dataclasses.replace(BEST, pad_to_multiple_of=None),
    # one packed row per step: SDPA gets a dense block-diagonal mask over the whole row (slower than grouping)
    "padding_free": dataclasses.replace(BEST, padding_free=True, group_by_length=False),
}
# the profile's batch and layout on TRL and transformers as shipped
RECIPES["stock"] = dataclasses.replace(BEST, speedups=False)
# the profile's recipe with one training speed-up turned off: (module, attribute, replacement)
PATCHED_RECIPES = {
    "best_without_decoded_nf4": (decoded_nf4, "available", lambda: False),
    "best_without_lean_lora": (lean_lora, "available", lambda: False),
    "best_without_fused_rotary": (fused_rotary, "rotate_queries_and_keys", fused_rotary.rotate_eagerly),
    "best_with_lora_scale_on_output": (lean_lora, "scales_on_rank", lambda scale: False),
}
RECIPES.update({name: BEST for name in PATCHED_RECIPES})
# the 4-bit + LoRA path's generation: the profile's settings on the unmerged model (transformers' generate)
UNMERGED_GENERATION = dataclasses.replace(PROFILES["phi2"].generation, merged_bf16=False, cache="dynamic")
# SDPA kernels other than cuDNN's (which plans each new shape on the host), for generation trials
WITHOUT_CUDNN = ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "MATH")
# the phi2 profile's generation path, whose run gives gen_batched_per_s
PROFILE_GENERATION_PATH = "merged_bf16_static"
assert PROFILES["phi2"].generation.merged_bf16 and PROFILES["phi2"].generation.cache == "static", (
    "PROFILE_GENERATION_PATH names another path")
# the profile's generation against the same with one change each, on the merged model
GENERATION_VARIANTS = {
    "merged_bf16_static_again": {},  # the same again: the first pass pays one-time costs, as a fresh asset run does
    "merged_bf16_eager_steps": {"cuda_graph": False},  # every decoding step launched from Python
    "merged_bf16_two_batches": {"batch_size": 250},  # near the memory-filling split of earlier runs (358 + 142)
}
# transformers' generate as shipped, on its default dynamic cache (its static cache compiles the model first)
GENERATION_VARIANTS["merged_bf16_stock"] = {"speedups": False, "cache": "dynamic"}
# the profile's settings with one speed-up's module attribute replaced: (module, attribute, replacement)
PATCHED_GENERATION_VARIANTS = {
    # every decoding step attends under the batch's padding mask, over every cache column
    "merged_bf16_masked_decoding": (filled_columns, "available", lambda model: False),
    # query, key and value projected by three matmuls, as transformers' PhiAttention does
    "merged_bf16_separate_qkv": (fused_qkv, "applied", lambda model: contextlib.nullcontext()),
    # the MLP's first matmul and its GELU as two kernels, as transformers' PhiMLP runs them
    "merged_bf16_separate_gelu": (gelu_epilogue, "available", lambda: False),
    # prefill chunks written into the static cache by torch.gather instead of the Triton kernel
    "merged_bf16_gathered_prefill_writes": (static_decoding, "_HAS_TRITON", False),
    # prefill in chunks of at most 8k, 32k or 64k padded tokens instead of 16k
    "merged_bf16_prefill_8k": (static_decoding, "PREFILL_CHUNK_TOKENS", 8_192),
    "merged_bf16_prefill_32k": (static_decoding, "PREFILL_CHUNK_TOKENS", 32_768),
    "merged_bf16_prefill_64k": (static_decoding, "PREFILL_CHUNK_TOKENS", 65_536),
}
for _name in PATCHED_GENERATION_VARIANTS:
    GENERATION_VARIANTS[_name] = {}
details: dict = {"steps": STEPS, "effective_batch": EFFECTIVE_BATCH,
                 "peak_bf16_flops_used": gpu_metrics.PEAK_BF16_FLOPS}


class PhaseTimeout(BaseException):
    """Raised by the alarm; a BaseException so that no `except Exception` retry loop swallows it."""


def _alarm(signum, frame):
    raise PhaseTimeout()


def phase(name: str, seconds: int, fn: Callable[[], object]) -> object:
    """Run one part under a time limit; a failure is recorded and the run goes on."""
    print(f"--- {name} (limit {seconds} s)", flush=True)
    signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(seconds)
    started = time.perf_counter()
    try:
        return fn()
    except (Exception, PhaseTimeout) as error:  # noqa: BLE001
        traceback.print_exc()
        details.setdefault("errors", {})[name] = f"{type(error).__name__}: {error}"[:600]
        return None
    finally:
        signal.alarm(0)
        details.setdefault("phase_seconds", {})[name] = round(time.perf_counter() - started, 1)
        after_phase()
        free_memory()


def after_phase() -> object:
    """Saves the figures after every part, so a run cut short still leaves them (bench/gpu_profile.py rebinds this
    name to save its own instead)."""
    return write_figures()


@dataclasses.dataclass
class Inputs:
    """The phi-2-shaped model in 4-bit NF4 through the project's loader, and the XSum-shaped rows every recipe
    trains on."""

    spec: models.ModelSpec
    model_dir: str
    tokenizer: PreTrainedTokenizerBase
    model: PreTrainedModel
    train: datasets.Dataset
    evaluation: datasets.Dataset
    lengths: list[int]
    flops_per_token: float


def phi2_shape_checkpoint() -> tuple[models.ModelSpec, str, PreTrainedTokenizerBase]:
    """The phi-2-shaped checkpoint saved once under WORK, its 4-bit spec and its tokenizer."""
    OUTPUT_DIR.mkdir(parents=True, exist_ok=True)
    WORK.mkdir(parents=True, exist_ok=True)
    model_dir = str(save_phi2_shape(WORK / "phi2-shape"))
    spec = models.ModelSpec(source="local", name_or_path=model_dir, load_in_4bit=True)
    return spec, model_dir, models.load_tokenizer(spec, model_dir)


@contextlib.contextmanager
def sdpa_backends(names: tuple[str, ...] | None):
    """SDPA restricted to these kernels; None leaves PyTorch's choice (cuDNN first on Hopper)."""
    if names is None:
        yield
        return
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel([getattr(SDPBackend, name) for name in names]):
        yield


def set_steps(steps: int) -> None:
    """Every recipe trains `steps` optimizer steps, one pass over `steps` distinct batches."""
    global STEPS
    STEPS = details["steps"] = steps
    for name, settings in RECIPES.items():
        RECIPES[name] = dataclasses.replace(settings, max_steps=steps)


def load_inputs() -> Inputs:
    spec, model_dir, tokenizer = phi2_shape_checkpoint()
    model = models.load_model(spec, model_dir, models.choose_precision(True))
    rows = synthetic_tokenized_xsum(STEPS * EFFECTIVE_BATCH + 32)
    trained = STEPS * EFFECTIVE_BATCH
    train, evaluation = rows.select(range(trained)), rows.select(range(trained, len(rows)))
    lengths = [len(ids) for ids in train["input_ids"]]
    lora = expected_trainable_parameters(model, target_modules_for(model, BEST), BEST.lora_r)
    flops_per_token = gpu_metrics.train_flops(model.config, lengths, lora) / sum(lengths)
    return Inputs(spec, model_dir, tokenizer, model, train, evaluation, lengths, flops_per_token)


def save_details() -> None:
    (OUTPUT_DIR / "h200-details.json").write_text(json.dumps(details, indent=1, default=str))


def free_memory() -> None:
    gc.collect()
    torch.cuda.empty_cache()


def check_packed_equals_padded(model, rows) -> dict:
    """Padding-free batches rely on transformers turning position_ids into a block-diagonal mask under SDPA
    (TRL documents flash-attention only): the same sequences padded and packed must give the same log-probs."""
    sequences = [torch.tensor(ids) for ids in rows["input_ids"][:8]]
    longest = max(len(s) for s in sequences)
    padded = torch.full((len(sequences), longest), EOS_ID)
    mask = torch.zeros_like(padded)
    for row, ids in enumerate(sequences):
        padded[row, : len(ids)], mask[row, : len(ids)] = ids, 1
    with torch.inference_mode():
        padded_logits = model(input_ids=padded.cuda(), attention_mask=mask.cuda(), use_cache=False).logits.float()
        packed = torch.cat(sequences)[None].cuda()
        positions = torch.cat([torch.arange(len(s)) for s in sequences])[None].cuda()
        # no cache: with one, transformers reads the position ids as a continuation, not as packed sequences
        packed_logits = model(input_ids=packed, position_ids=positions, use_cache=False).logits.float()[0]
    worst, offset = 0.0, 0
    for row, ids in enumerate(sequences):
        a = torch.log_softmax(padded_logits[row, : len(ids)], -1)
        b = torch.log_softmax(packed_logits[offset : offset + len(ids)], -1)
        worst = max(worst, float((a - b).abs().max()))
        offset += len(ids)
    return {"max_abs_logprob_diff": round(worst, 4), "sequences": len(sequences), "equal_within_bf16": worst < 0.25}


class LinesOf(logging.Handler):
    """The messages a logger writes at INFO and above from now until `close()`, also printed."""

    def __init__(self, logger: logging.Logger):
        super().__init__(logging.INFO)
        self.logger, self.level_before, self.messages = logger, logger.level, []
        logger.setLevel(logging.INFO)
        logger.addHandler(self)

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())
        print(record.getMessage(), flush=True)

    def close(self) -> None:
        self.logger.removeHandler(self)
        self.logger.setLevel(self.level_before)
        super().close()


def steady_rate(lines: list[tuple[float, str]], tokens_seen: int) -> dict:
    """Tokens/s after the first progress line (LOGGED_EVERY steps), from the lines' timestamps and cumulative
    rates.

    A line k says rate_k = tokens_k / (t_k - start); the last one's tokens are the run's total, which fixes
    `start`; then tokens_1 follows, and the steady rate is (tokens_N - tokens_1) / (t_N - t_1).
    """
    points = [(t, int(m[1]), float(m[3]), float(m[4].replace(",", "")))
              for t, text in lines if (m := PROGRESS.search(text))]
    if len(points) < 3:
        return {}
    t_first, _, _, rate_first = points[0]
    t_last, _, _, rate_last = points[-1]
    start = t_last - tokens_seen / rate_last
    tokens_first = rate_first * (t_first - start)
    return {
        "steady_tok_s": (tokens_seen - tokens_first) / (t_last - t_first),
        "first_log_s": t_first - start,
        "losses": [loss for _, _, loss, _ in points],
    }


RECORDED_SETTINGS = ("per_device_batch_size", "gradient_accumulation_steps", "gradient_checkpointing", "padding_free",
                     "pad_to_multiple_of", "compile_layers", "cuda_graph", "lora_dropout_kernel", "dataloader_workers",
                     "bf16", "optimizer", "speedups")


def train_recipe(name: str, settings: TrainSettings, model, tokenizer, train, evaluation,
                 flops_per_token: float) -> dict:
    lines: list[tuple[float, str]] = []

    def on_log(text: str) -> None:
        lines.append((time.monotonic(), text))
        print(f"[{name}] {text}", flush=True)

    capped = name == "lean"
    total = torch.cuda.get_device_properties(0).total_memory
    if capped:  # a real 16 GB card's limit: any step that needs more fails with out-of-memory
        torch.cuda.set_per_process_memory_fraction(LEAN_CARD_GIB * 2**30 / total)
    graph_lines = LinesOf(graphed_steps.log)
    try:
        artifact = train_lora(model, tokenizer, train, evaluation, settings, WORK / f"adapter-{name}",
                              WORK / "checkpoints", on_log)
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
        graph_lines.close()
    steady = steady_rate(lines, artifact.tokens_seen)
    tok_s = steady.get("steady_tok_s", artifact.tokens_per_second)
    result = {
        "settings": {key: getattr(settings, key) for key in RECORDED_SETTINGS},
        "tok_s": round(tok_s),
        "tok_s_end_to_end": round(artifact.tokens_per_second),
        "first_log_s": round(steady.get("first_log_s", float("nan")), 2),
        "mfu": round(gpu_metrics.mfu(flops_per_token * tok_s, 1.0), 3),
        "peak_mem_gib": round(artifact.peak_memory_mb / 1024, 2),
        "memory_cap_gib": LEAN_CARD_GIB if capped else None,
        "steps": artifact.steps,
        "tokens_seen": artifact.tokens_seen,
        "train_losses": [round(x, 4) for x in artifact.train_losses],
        "final_train_loss": round(artifact.final_train_loss, 4),
        "eval_loss_base": round(artifact.base_eval_loss, 4),
        "eval_loss_after": round(artifact.eval_loss, 4),
        "train_seconds": round(artifact.train_seconds, 1),
        "graphed_steps": graph_lines.messages,  # how many steps replayed, from how many graphs, or why none
    }
    details.setdefault("training", {})[name] = result
    return result


GENERATION_SETTINGS = ("batch_size", "cache", "cuda_graph", "sort_by_length", "max_new_tokens", "speedups")


def generation_run(name: str, model, tokenizer, articles: list[str], settings) -> list:
    torch.cuda.reset_peak_memory_stats()
    result = generate.generate_summaries(model, tokenizer, articles, settings)
    records = result.records
    details.setdefault("generation", {})[name] = {
        "summaries": len(records),
        "per_s": round(result.summaries_per_second, 3),
        "seconds": round(result.seconds, 2),
        "batch_size": result.batch_size,
        "batches": result.batch_sizes,
        "batch_seconds": [round(x, 3) for x in result.batch_seconds],
        "nonempty_rate": result.success_rate,
        "mean_new_tokens": round(float(np.mean([r.new_tokens for r in records])), 1),
        "peak_mem_gib": gpu_metrics.gib(torch.cuda.max_memory_allocated()),
        "settings": {key: getattr(settings, key) for key in GENERATION_SETTINGS},
    }
    return records


def split_batches(model, tokenizer, articles: list[str], settings) -> None:
    """Each batch of the profile's run again with one new token: its prefill time. The rest of the batch's time,
    per decoding step, against the cache it reads (rows x cache length), with CUDA graphs and with eager steps.
    (`max_new_tokens=1` on all articles would let the planner split them differently.)"""
    from phi2_assets.ml.speedups.batch_planning import cache_length
    from phi2_assets.ml.tokenization import encode_prompts

    generation = details["generation"]
    prompts = encode_prompts(tokenizer, settings.template, articles, settings.max_prompt_tokens)
    order = sorted(range(len(prompts)), key=lambda index: len(prompts[index]))
    steps, start, batches = settings.max_new_tokens - 1, 0, []
    for position, rows in enumerate(generation[PROFILE_GENERATION_PATH]["batches"]):
        chosen = order[start:start + rows]
        start += rows
        once = dataclasses.replace(settings, max_new_tokens=1, batch_size=rows)
        prefill = generate.generate_summaries(model, tokenizer, [articles[i] for i in chosen], once).batch_seconds[0]
        width, prompt_tokens = max(len(prompts[i]) for i in chosen), sum(len(prompts[i]) for i in chosen)
        entry = {"rows": rows, "width": width, "cache": cache_length(width, settings.max_new_tokens),
                 "prefill_s": round(prefill, 3), "prefill_padded_tok_s": round(rows * width / prefill),
                 "prefill_prompt_tok_s": round(prompt_tokens / prefill)}
        for name, label in (("merged_bf16_static_again", "graph"), ("merged_bf16_eager_steps", "eager")):
            if name in generation:
                decoding = generation[name]["batch_seconds"][position] - prefill
                entry[f"{label}_ms_per_step"] = round(decoding / steps * 1e3, 2)
        batches.append(entry)
    details["generation_split"] = batches


def agreement(reference: list, other: list) -> dict:
    """Share of identical summaries, and mean share of leading words that agree."""
    exact, prefix = [], []
    for a, b in zip(reference, other, strict=True):
        words_a, words_b = a.text.split(), b.text.split()
        same = next((i for i, (x, y) in enumerate(zip(words_a, words_b, strict=False)) if x != y),
                    min(len(words_a), len(words_b)))
        exact.append(a.text == b.text)
        prefix.append(same / max(len(words_a), len(words_b), 1))
    return {"exact_match": round(float(np.mean(exact)), 3), "mean_prefix_agreement": round(float(np.mean(prefix)), 3),
            "pairs": len(exact)}


def teacher_forcing_probes(tokenizer, articles: list[str], settings, count: int = 8) -> list[list[int]]:
    """The prompts `generate_summaries` encodes for the first articles."""
    from phi2_assets.ml.tokenization import encode_prompts

    return encode_prompts(tokenizer, settings.template, articles[:count], settings.max_prompt_tokens)


def next_token_logprobs(model, prompts: list[list[int]]) -> dict:
    """Log-probs of every next token over the prompts, one at a time (no padding), on the model's device."""
    logprobs = []
    with torch.inference_mode():
        for ids in prompts:
            logits = model(input_ids=torch.tensor([ids], device=model.device), use_cache=False).logits[0].float()
            logprobs.append(torch.log_softmax(logits, -1))
    return {"logprobs": logprobs}


def compare_logprobs(reference: dict, other: dict) -> dict:
    """How close a merged model is to 4-bit + LoRA: top-1 agreement over every prompt position, and the
    largest / mean absolute difference of the log-probability the reference gives its own top token."""
    same, total, diffs = 0, 0, []
    for a, b in zip(reference["logprobs"], other["logprobs"], strict=True):
        top = a.argmax(-1)
        same += int((top == b.argmax(-1)).sum())
        total += top.numel()
        diffs.append((a.gather(-1, top[:, None]) - b.gather(-1, top[:, None])).abs().flatten())
    diff = torch.cat(diffs)
    return {"top1_agreement": round(same / total, 4), "positions": total,
            "max_abs_logprob_diff": round(float(diff.max()), 4), "mean_abs_logprob_diff": round(float(diff.mean()), 4)}


def main() -> None:
    global OUTPUT_DIR
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipes", nargs="+", choices=list(RECIPES), default=list(RECIPES))
    parser.add_argument("--skip-generation", action="store_true")
    parser.add_argument("--generation-variants", nargs="*", choices=list(GENERATION_VARIANTS),
                        default=list(GENERATION_VARIANTS), help="variants of the profile's generation path to run")
    parser.add_argument("--evaluation-batches", nargs="*", type=int, default=[16, 64],
                        help="evaluation batch sizes timed with sorted and with length-grouped batches (none: skip)")
    parser.add_argument("--profile-path-only", action="store_true",
                        help="generate on the profile's merged model only: no merge into the original checkpoint, "
                             "no 4-bit + LoRA reference paths")
    parser.add_argument("--pipeline-json", type=Path, default=None,
                        help="bench/gpu_pipeline.py's results: their pipeline_seconds join the figures")
    parser.add_argument("--steps", type=int, default=STEPS,
                        help="optimizer steps per recipe, on as many distinct batches of 16 rows (the phi2 "
                             "profile's run is 375)")
    gpu_metrics.add_common_arguments(parser)
    args = parser.parse_args()
    OUTPUT_DIR = args.output_dir
    set_steps(args.steps)
    details["commit"] = gpu_metrics.commit(args.commit)
    if args.pipeline_json:
        details["pipeline"] = json.loads(args.pipeline_json.read_text())
    inputs = load_inputs()
    details["environment"] = gpu_metrics.environment()
    details["measured_peak_bf16_tflops"] = round(gpu_metrics.measure_peak_bf16() / 1e12, 1)
    details["profile_generation_path"] = PROFILE_GENERATION_PATH
    details["data"] = {"train_rows": len(inputs.train), "mean_tokens": round(float(np.mean(inputs.lengths)), 1),
                       "max_tokens": max(inputs.lengths), "flops_per_token": inputs.flops_per_token}
    phase("packed_equals_padded", 60, lambda: details.__setitem__(
        "packed_equals_padded", check_packed_equals_padded(inputs.model, inputs.train)))
    training_phases(inputs, args.recipes)
    evaluation_phases(inputs, args.evaluation_batches)
    if not args.skip_generation:
        generation_phases(inputs, args.generation_variants, args.profile_path_only)
    print_tables(write_figures())


def training_phases(inputs: Inputs, recipes: list[str]) -> None:
    # one-time costs (the decoder layers' compile, TRL's Triton log-prob kernels, the allocator's growth) land in
    # the warm-up, not in the first measured recipe: a run of 8 steps measured 4,480 tok/s for a recipe that came first
    compiled = any(RECIPES[name].compile_layers for name in recipes)
    warm_up = dataclasses.replace(BEST, max_steps=2, compile_layers=compiled)
    phase("warm-up", 300, lambda: train_lora(inputs.model, inputs.tokenizer, inputs.train.select(range(32)),
                                            inputs.evaluation.select(range(8)), warm_up, WORK / "adapter-warm-up",
                                            WORK / "checkpoints"))
    for name in recipes:
        patch = (unittest.mock.patch.object(*PATCHED_RECIPES[name]) if name in PATCHED_RECIPES
                 else contextlib.nullcontext())

        def run(name=name, patch=patch):
            with patch:
                return train_recipe(name, RECIPES[name], inputs.model, inputs.tokenizer, inputs.train,
                                    inputs.evaluation, inputs.flops_per_token)

        phase(f"train {name}", 150 if name == "seed" else 60, run)


def evaluation_phases(inputs: Inputs, batch_sizes: list[int]) -> None:
    """The profile's recipe for one step, evaluated on EVALUATION_ROWS held-out rows before and after it, at each
    evaluation batch size: batches sorted by length (the profile's speed-ups) against Trainer's length-grouped
    sampler (the same speed-ups with `sorted_evaluation` off)."""
    rows = synthetic_tokenized_xsum(EVALUATION_ROWS, seed=1)
    one_step = dataclasses.replace(BEST, max_steps=1)
    for batch in batch_sizes:
        for order in ("sorted", "grouped"):
            patch = (unittest.mock.patch.object(sorted_evaluation, "available", lambda: False)
                     if order == "grouped" else contextlib.nullcontext())

            def run(name=f"{order}_{batch}", batch=batch, patch=patch):
                with patch:
                    artifact = train_lora(inputs.model, inputs.tokenizer, inputs.train.select(range(EFFECTIVE_BATCH)),
                                          rows, dataclasses.replace(one_step, eval_batch_size=batch),
                                          WORK / f"adapter-evaluation-{name}", WORK / "checkpoints")
                details.setdefault("evaluation", {})[name] = {
                    "rows": len(rows), "eval_batch_size": batch, "evaluations": artifact.evaluations,
                    "seconds_per_evaluation": round(artifact.evaluation_seconds / artifact.evaluations, 2),
                    "eval_loss_base": round(artifact.base_eval_loss, 4),
                    "eval_loss_after": round(artifact.eval_loss, 4)}

            phase(f"evaluate {order} {batch}", 90, run)


def generation_phases(inputs: Inputs, variant_names: list[str], profile_path_only: bool) -> None:
    """The profile's path first (its first pass is the process's first generation, as an evaluation step's),
    its variants, then (unless `profile_path_only`) the same adapter merged into the original bf16 checkpoint and
    the 4-bit + LoRA path that every other path is compared with."""
    adapter = WORK / "adapter-best"
    articles = synthetic_articles(MERGED_ARTICLES)
    probes = teacher_forcing_probes(inputs.tokenizer, articles, PROFILES["phi2"].generation)
    outputs: dict[str, list] = {}
    logprobs: dict[str, dict] = {}
    checkpoint_spec = dataclasses.replace(inputs.spec, load_in_4bit=False)
    loaders = {"merged_bf16": lambda: generate.load_merged_bf16(inputs.spec, inputs.model_dir, adapter),
               "merged_checkpoint_bf16": lambda: generate.load_merged_bf16(checkpoint_spec, inputs.model_dir, adapter)}
    if profile_path_only:
        loaders = {"merged_bf16": loaders["merged_bf16"]}
    for kind, loader in loaders.items():
        merged_generation(kind, loader, inputs.tokenizer, articles, probes, outputs, logprobs, variant_names)
    if not profile_path_only:
        with contextlib.ExitStack() as stack:
            adapted = stack.enter_context(models.adapted(inputs.model, adapter)) if adapter.is_dir() else inputs.model
            unmerged_generation(adapted, inputs.tokenizer, articles, probes, outputs, logprobs)
        free_memory()
    compare_paths(outputs, logprobs)


def merged_generation(kind: str, loader: Callable[[], object], tokenizer, articles: list[str], probes, outputs: dict,
                      logprobs: dict, variant_names: list[str]) -> None:
    """One merged model: the profile's settings (and, for the profile's own merge, each variant) on 500 articles."""
    settings = PROFILES["phi2"].generation  # greedy, 60 new tokens, batches planned within free memory
    merged: dict = {}
    phase(f"load {kind}", 60, lambda: merged.__setitem__("model", loader()))
    if "model" not in merged:
        return
    chosen = [(name, GENERATION_VARIANTS[name]) for name in GENERATION_VARIANTS if name in variant_names]
    variants = [(f"{kind}_static", {})] + (chosen if kind == "merged_bf16" else [])
    for name, options in variants:
        patch = (unittest.mock.patch.object(*PATCHED_GENERATION_VARIANTS[name])
                 if name in PATCHED_GENERATION_VARIANTS else contextlib.nullcontext())

        def run(name=name, options=options, patch=patch):
            with patch:
                outputs[name] = generation_run(name, merged["model"], tokenizer, articles,
                                               dataclasses.replace(settings, **options))

        phase(f"generate {name}", 45, run)
    if kind == "merged_bf16":
        phase("split prefill and decoding", 45, lambda: split_batches(merged["model"], tokenizer, articles, settings))
    phase(f"log-probs {kind}", 30, lambda: logprobs.__setitem__(kind, next_token_logprobs(merged["model"], probes)))
    merged.clear()
    free_memory()


def unmerged_generation(adapted, tokenizer, articles: list[str], probes, outputs: dict, logprobs: dict) -> None:
    """4-bit + LoRA, exactly what was trained: teacher-forced log-probs, one prompt at a time, then batched."""
    sequential = dataclasses.replace(UNMERGED_GENERATION, batch_size=1, sort_by_length=False)
    phase("reference log-probs 4-bit", 30, lambda: logprobs.__setitem__("4bit", next_token_logprobs(adapted, probes)))
    phase("generate sequential", 60, lambda: outputs.__setitem__("sequential", generation_run(
        "sequential", adapted, tokenizer, articles[:SEQUENTIAL_ARTICLES], sequential)))
    phase("generate batched 4-bit", 60, lambda: outputs.__setitem__("batched_4bit", generation_run(
        "batched_4bit", adapted, tokenizer, articles[:UNMERGED_ARTICLES], UNMERGED_GENERATION)))


def compare_paths(outputs: dict[str, list], logprobs: dict[str, dict]) -> None:
    """Each path's summaries and log-probs against 4-bit + LoRA, and the variants' summaries against the profile's
    path (a CUDA graph replays the eager step's kernels: those must be identical)."""
    if "4bit" in logprobs:
        details["logprobs_vs_4bit"] = {kind: compare_logprobs(logprobs["4bit"], values)
                                       for kind, values in logprobs.items() if kind != "4bit"}
    if "batched_4bit" in outputs:
        first = outputs["batched_4bit"]
        details["summaries_vs_4bit"] = {name: agreement(first, records[: len(first)])
                                        for name, records in outputs.items()
                                        if name not in ("batched_4bit", "sequential")}
        if "sequential" in outputs:
            details["summaries_vs_4bit"]["sequential"] = agreement(outputs["sequential"], first[:SEQUENTIAL_ARTICLES])
    if PROFILE_GENERATION_PATH in outputs:
        details["summaries_vs_profile_path"] = {name: agreement(outputs[PROFILE_GENERATION_PATH], outputs[name])
                                                for name in GENERATION_VARIANTS if name in outputs}


def ratio(numerator: float | None, denominator: float | None, digits: int = 2) -> float | None:
    return round(numerator / denominator, digits) if numerator and denominator else None


def write_figures() -> dict:
    """The headline figures, every ratio between parts of this one run. The best recipe found is the profile's with
    compiled layers when that ran (the profile keeps eager layers: over its 375 steps the compile costs more than
    it saves)."""
    training, generation = details.get("training", {}), details.get("generation", {})
    seed, profile, stock, lean = (training.get(k, {}) for k in ("seed", "best", "stock", "lean"))
    best = training.get("best_compiled") or profile
    batched = generation.get(PROFILE_GENERATION_PATH, {})  # the first pass of the process, as an asset run meets it
    sequential = generation.get("sequential", {}).get("per_s")
    stock_generation = generation.get("merged_bf16_stock", {}).get("per_s")
    figures = {
        "commit": details.get("commit"),
        "train_seed_tok_s": seed.get("tok_s"),
        "train_best_tok_s": best.get("tok_s"),
        "train_speedup": ratio(best.get("tok_s"), seed.get("tok_s")),
        "mfu_best": best.get("mfu"),
        "peak_mem_seed_gib": seed.get("peak_mem_gib"),
        "peak_mem_best_gib": best.get("peak_mem_gib"),
        "train_profile_tok_s": profile.get("tok_s"),
        "mfu_profile": profile.get("mfu"),
        "train_profile_speedup": ratio(profile.get("tok_s"), seed.get("tok_s")),
        "train_stock_tok_s": stock.get("tok_s"),
        "mfu_stock": stock.get("mfu"),
        "train_profile_vs_stock": ratio(profile.get("tok_s"), stock.get("tok_s")),
        "train_lean_tok_s": lean.get("tok_s"),
        "peak_mem_lean_gib": lean.get("peak_mem_gib"),
        "gen_sequential_per_s": sequential,
        "gen_batched_per_s": batched.get("per_s"),
        "gen_speedup": ratio(batched.get("per_s"), sequential, 1),
        "gen_nonempty_rate": batched.get("nonempty_rate"),
        "gen_stock_per_s": stock_generation,
        "gen_profile_vs_stock": ratio(batched.get("per_s"), stock_generation),
        "pipeline_seconds": details.get("pipeline", {}).get("pipeline_seconds"),
        "pipeline_commit": details.get("pipeline", {}).get("commit"),
        "environment": {**details.get("environment", {}),
                        "measured_peak_bf16_tflops": details.get("measured_peak_bf16_tflops")},
    }
    (OUTPUT_DIR / "h200.json").write_text(json.dumps(figures, indent=2))
    save_details()
    return figures


def print_tables(figures: dict) -> None:
    training, generation = details.get("training", {}), details.get("generation", {})
    print("\n| training | tok/s | end-to-end | MFU | peak GiB | loss after | eval loss |")
    print("|---|---|---|---|---|---|---|")
    for name, r in training.items():
        print(f"| {name} | {r['tok_s']:,} | {r['tok_s_end_to_end']:,} | {r['mfu']:.1%} | {r['peak_mem_gib']} "
              f"| {r['final_train_loss']} | {r['eval_loss_after']} |")
    print("\n| generation | summaries/s | batches | non-empty | peak GiB |")
    print("|---|---|---|---|---|")
    for name, r in generation.items():
        batches = " + ".join(map(str, r["batches"]))
        print(f"| {name} | {r['per_s']} | {batches} | {r['nonempty_rate']:.0%} | {r['peak_mem_gib']} |")
    print("\n| evaluation | rows | batch | s per evaluation | base eval loss |")
    print("|---|---|---|---|---|")
    for name, r in details.get("evaluation", {}).items():
        print(f"| {name} | {r['rows']} | {r['eval_batch_size']} | {r['seconds_per_evaluation']} "
              f"| {r['eval_loss_base']} |")
    print(json.dumps({k: v for k, v in figures.items() if k != "environment"}))
    keys = ("generation_split", "summaries_vs_4bit", "summaries_vs_profile_path", "logprobs_vs_4bit",
            "packed_equals_padded", "errors", "phase_seconds")
    print(json.dumps({k: details.get(k) for k in keys}))


if __name__ == "__main__":
    main()
