"""FLOP counts, measured ceilings and environment facts for the GPU benchmark.

Training FLOPs per token of a QLoRA step (frozen base, adapters trained):
    4·N                 forward (2N) + backward through the activations (2N); a frozen base has no weight gradients
  + 12·layers·d·c       attention scores and values, forward + backward (2× forward), c = mean causal context
  + 6·N_lora            the adapters, forward and both backward products
N = the matmul weights of the 32 decoder layers and the LM head (2.648e9 for phi-2; the embedding is a lookup);
the LM head counts at every position, as the model defines it, although TRL's fused head skips unsupervised ones.
Recomputation under activation checkpointing is not counted: MFU measures useful work over the peak.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path

import torch

PEAK_BF16_FLOPS = 790e12  # dense bf16 matmul measured on an H200 (8192-cube products: 769-798 TFLOP/s)
DEFAULT_OUTPUT_DIR = Path("data/bench")
COMMIT_HELP = "the commit measured (default: `git rev-parse HEAD` of this checkout, with -dirty for local changes)"


def gib(value: float) -> float:
    return round(value / 2**30, 2)


def matmul_parameters(config) -> int:
    h, i, layers, vocab = config.hidden_size, config.intermediate_size, config.num_hidden_layers, config.vocab_size
    return layers * (4 * h * h + 2 * h * i) + h * vocab


def train_flops(config, lengths: Sequence[int], lora_parameters: int) -> float:
    """Useful FLOPs of one forward + backward over sequences of these real (unpadded) lengths."""
    tokens = sum(lengths)
    context = sum(n * (n + 1) / 2 for n in lengths)  # sum over tokens of their causal context
    attention = 12 * config.num_hidden_layers * config.hidden_size * context
    return 4 * matmul_parameters(config) * tokens + attention + 6 * lora_parameters * tokens


def mfu(flops: float, seconds: float, peak: float = PEAK_BF16_FLOPS) -> float:
    return flops / seconds / peak


def cuda_milliseconds(fn, repeats: int = 20, warm_ups: int = 1) -> float:
    """Mean GPU time of one call of `fn`, by CUDA events around `repeats` calls after `warm_ups` untimed ones."""
    for _ in range(warm_ups):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / repeats


def measure_peak_bf16(size: int = 8_192, repeats: int = 10) -> float:
    a, b = (torch.randn(size, size, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        a @ b
    end.record()
    torch.cuda.synchronize()
    return 2 * size**3 * repeats / (start.elapsed_time(end) / 1e3)


def environment() -> dict:
    def version(name: str) -> str:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return "absent"

    packages = ("torch", "transformers", "trl", "peft", "bitsandbytes", "accelerate", "datasets", "dagster")
    env = {name: version(name) for name in packages}
    env["python"] = platform.python_version()
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name()
        env["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
        env["cuda"] = torch.version.cuda
        try:
            env["driver"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True, text=True,
                timeout=30, check=False,
            ).stdout.split("\n")[0].strip()  # one line per GPU: the first
        except (OSError, subprocess.SubprocessError):
            env["driver"] = "unknown"
    return env


def write_kernel_results(path: str | Path, results: list[dict]) -> None:
    """A kernel benchmark's rows as JSON, with the GPU and the torch release they were measured on."""
    with open(path, "w") as out:
        json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "results": results}, out,
                  indent=1)


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    """`--output-dir` and `--commit`, which every GPU benchmark takes."""
    parser.add_argument("--output-dir", type=Path, default=DEFAULT_OUTPUT_DIR, help="where the JSON results go")
    parser.add_argument("--commit", default=None, help=COMMIT_HELP)


def commit(given: str | None) -> str:
    """The commit measured: the one given, else this checkout's HEAD (-dirty with uncommitted changes), else unknown."""
    if given:
        return given
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=30, check=True)
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                                text=True, timeout=30, check=True)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head.stdout.strip() + ("-dirty" if status.stdout.strip() else "")
