"""The fused rotary kernel against transformers' eager rotation on the GPU: bit-equal outputs on Phi-2's shape
(prefill chunks and decoding steps, queries and keys as the strided views `PhiAttention` makes), and the time of
each on a prefill chunk of 16,384 tokens. Prints one JSON line and writes <output-dir>/h200-rotary-check.json.

On a CUDA machine, from the repository root with the project's dependencies installed:

    PYTHONPATH=. python bench/rotary_check.py [--output-dir data/bench]
"""

from __future__ import annotations

import argparse
import json

import torch

from bench import gpu_metrics
from phi2_assets.ml.speedups import fused_rotary as rotary
from phi2_assets.ml.speedups.fused_rotary_kernel import rotate

HEADS, HEAD_DIM, ROTARY = 32, 80, 32  # Phi-2: 2,560 = 32 x 80, partial rotary 0.4


def views(rows: int, positions: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Query and key as `PhiAttention` holds them (projections viewed per head, transposed), and cos/sin."""
    def projected() -> torch.Tensor:
        flat = torch.randn(rows, positions, HEADS * HEAD_DIM, device="cuda", dtype=torch.bfloat16)
        return flat.view(rows, positions, HEADS, HEAD_DIM).transpose(1, 2)

    angles = torch.rand(rows, positions, ROTARY // 2, device="cuda") * 1000
    angles = torch.cat((angles, angles), dim=-1)
    return projected(), projected(), angles.cos().bfloat16(), angles.sin().bfloat16()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    gpu_metrics.add_common_arguments(parser)
    args = parser.parse_args()
    torch.manual_seed(0)
    report: dict = {"commit": gpu_metrics.commit(args.commit), "equal": {}}
    for rows, positions in ((16, 1024), (31, 514), (346, 1), (1, 7)):
        query, key, cos, sin = views(rows, positions)
        fused, reference = rotate(query, key, cos, sin, ROTARY), rotary.rotate_eagerly(query, key, cos, sin, ROTARY)
        report["equal"][f"{rows}x{positions}"] = all(torch.equal(a, b) for a, b in zip(fused, reference, strict=True))
    query, key, cos, sin = views(16, 1024)
    fused_ms = gpu_metrics.cuda_milliseconds(lambda: rotate(query, key, cos, sin, ROTARY))
    eager_ms = gpu_metrics.cuda_milliseconds(lambda: rotary.rotate_eagerly(query, key, cos, sin, ROTARY))
    report["prefill_chunk_ms"] = {"fused": round(fused_ms, 3), "eager": round(eager_ms, 3)}
    print(json.dumps(report), flush=True)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    (args.output_dir / "h200-rotary-check.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
