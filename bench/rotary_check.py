"""The fused rotary kernel against transformers' eager rotation on the GPU: bit-equal outputs on Phi-2's shape
(prefill chunks and decoding steps, queries and keys as the strided views `PhiAttention` makes), and the time of
each on a prefill chunk of 16,384 tokens. Prints one JSON line and writes $OUT/h200-rotary-check.json.

    PYTHONPATH=/tmp/site:. python3 bench/rotary_check.py
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from phi2_assets.ml import rotary
from phi2_assets.ml.rotary_kernel import rotate

HEADS, HEAD_DIM, ROTARY = 32, 80, 32  # Phi-2: 2,560 = 32 x 80, partial rotary 0.4


def views(rows: int, positions: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Query and key as `PhiAttention` holds them (projections viewed per head, transposed), and cos/sin."""
    def projected() -> torch.Tensor:
        return torch.randn(rows, positions, HEADS * HEAD_DIM, device="cuda", dtype=torch.bfloat16).view(rows, positions, HEADS, HEAD_DIM).transpose(1, 2)

    angles = torch.rand(rows, positions, ROTARY // 2, device="cuda") * 1000
    angles = torch.cat((angles, angles), dim=-1)
    return projected(), projected(), angles.cos().bfloat16(), angles.sin().bfloat16()


def milliseconds(fn, repeats: int = 20) -> float:
    fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / repeats


def main() -> None:
    torch.manual_seed(0)
    report: dict = {"equal": {}}
    for rows, positions in ((16, 1024), (31, 514), (346, 1), (1, 7)):
        query, key, cos, sin = views(rows, positions)
        fused, reference = rotate(query, key, cos, sin, ROTARY), rotary.rotate_eagerly(query, key, cos, sin, ROTARY)
        report["equal"][f"{rows}x{positions}"] = all(torch.equal(a, b) for a, b in zip(fused, reference))
    query, key, cos, sin = views(16, 1024)
    report["prefill_chunk_ms"] = {"fused": round(milliseconds(lambda: rotate(query, key, cos, sin, ROTARY)), 3),
                                  "eager": round(milliseconds(lambda: rotary.rotate_eagerly(query, key, cos, sin, ROTARY)), 3)}
    print(json.dumps(report), flush=True)
    out = Path(os.environ.get("OUT", "/tmp/bench-out"))
    out.mkdir(parents=True, exist_ok=True)
    (out / "h200-rotary-check.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
