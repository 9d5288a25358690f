"""One adapter's dropout and first matmul at Phi-2's shapes, forward and backward, side by side, on CUDA.

For each input width (2,560 for the attention and fc1 adapters, 10,240 for fc2) and token count (a step of the
phi2 profile holds about 7,700), it times A(dropout(x)) with its backward pass two ways, bf16 as TRL trains a
4-bit model's adapters:

- `pytorch`: `nn.Dropout` then `F.linear`, as lean LoRA runs them (`lora_dropout_kernel: false`)
- `kernels/<block rows of the forward>`: `lora_dropout_kernel`'s three kernels (`lora_dropout_kernel: true`)

It prints milliseconds per forward and backward, the memory the forward leaves for the backward pass, and the
largest difference of the kernels' output from PyTorch's ops on the kernels' own draws.

    PYTHONPATH=. python bench/lora_dropout.py [--tokens 7680] [--widths 2560 10240] [--output FILE.json]
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from bench import gpu_metrics
from phi2_assets.ml.speedups import lean_lora, lora_dropout_kernel

RANK, P = 16, 0.05


def _inputs(tokens: int, width: int, generator: torch.Generator):
    x = torch.randn(tokens, width, generator=generator).to("cuda", torch.bfloat16).requires_grad_()
    a_weight = (torch.randn(RANK, width, generator=generator) * 0.02).to("cuda", torch.bfloat16).requires_grad_()
    upstream = torch.randn(tokens, RANK, generator=generator).to("cuda", torch.bfloat16)
    return x, a_weight, upstream


def _ways(x: torch.Tensor, a_weight: torch.Tensor) -> dict:
    dropout = torch.nn.Dropout(P)
    ways = {"pytorch": lambda: F.linear(dropout(x), a_weight)}
    for rows in (16, 32, 64):
        ways[f"kernels/{rows}"] = (lambda rows=rows: _with_block_rows(rows, x, a_weight))
    return ways


def _with_block_rows(rows: int, x: torch.Tensor, a_weight: torch.Tensor) -> torch.Tensor:
    lora_dropout_kernel.DOWN_BLOCK_ROWS = rows
    return lean_lora._KernelDropoutDown.apply(x, a_weight, P)


def _step(forward, x: torch.Tensor, a_weight: torch.Tensor, upstream: torch.Tensor):
    """The forward and backward pass of one way, as one call."""
    return lambda: torch.autograd.grad(forward(), (x, a_weight), upstream)


def _kept_bytes(forward) -> int:
    """Bytes the forward leaves allocated (what autograd keeps for the backward pass, and the output)."""
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    output = forward()
    kept = torch.cuda.memory_allocated() - before
    del output
    return kept


def _kernel_difference(x: torch.Tensor, a_weight: torch.Tensor) -> float:
    """Largest difference of the kernels' output from PyTorch's ops on the kernels' draws."""
    seed = torch.tensor([7], device="cuda")
    with torch.no_grad():
        reduced, bits = lora_dropout_kernel.down(x, a_weight, P, seed)
        keep = lora_dropout_kernel.unpacked_keep(bits)
        dropped = torch.where(keep, x.float() * (1 / (1 - P)), 0.0).bfloat16()
        return float((reduced.float() - F.linear(dropped, a_weight).float()).abs().max())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=7_680)
    parser.add_argument("--widths", type=int, nargs="+", default=[2_560, 10_240])
    parser.add_argument("--output", help="write the figures as JSON here too")
    args = parser.parse_args()
    generator, results = torch.Generator().manual_seed(0), []
    for width in args.widths:
        x, a_weight, upstream = _inputs(args.tokens, width, generator)
        difference = _kernel_difference(x.detach(), a_weight.detach())
        print(f"width {width}: the kernels against PyTorch's ops on their draws, max |diff| {difference:.2e}")
        for name, forward in _ways(x, a_weight).items():
            milliseconds = gpu_metrics.cuda_milliseconds(_step(forward, x, a_weight, upstream), repeats=50,
                                                         warm_ups=5)
            kept = _kept_bytes(forward)
            results.append({"tokens": args.tokens, "width": width, "way": name, "ms": round(milliseconds, 4),
                            "kept_mib": round(kept / 2**20, 2), "max_abs_difference": difference})
            print(f"{args.tokens:>6} x {width:<6} {name:>12} {milliseconds:8.4f} ms  kept {kept / 2**20:8.2f} MiB",
                  flush=True)
    if args.output:
        gpu_metrics.write_kernel_results(args.output, results)


if __name__ == "__main__":
    main()
