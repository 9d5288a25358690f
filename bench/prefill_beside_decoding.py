"""Whether one batch's prefill runs beside another batch's decoding steps on one GPU.

The `phi2` profile's generation path on the Phi-2-shaped model (bf16, no adapter): batch A's decoding steps (static
cache, split-KV attention, CUDA-graphed steps) alone, batch B's chunked prefill alone, then both at once: A decodes
from the main thread on the default stream while a second thread prefills B on a stream of its own, from the moment
A's step is recorded. Two prompts of similar length per batch row, from the middle of the benchmark's prompts.
Prints the seconds of each, and the time both at once took against the two alone added up: 1.0 means the GPU ran
them one after the other, 0.5 that each hid the other completely.

    PYTHONPATH=. python bench/prefill_beside_decoding.py [--rows 100] [--rounds 2] [--output FILE.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import threading
import time
import unittest.mock
from pathlib import Path

import torch

from bench import gpu_benchmark as bench
from bench.phi2_shape import synthetic_articles
from phi2_assets.ml import generate, speedups
from phi2_assets.ml.speedups import batch_planning, filled_columns, static_decoding
from phi2_assets.ml.tokenization import encode_prompts
from phi2_assets.profiles import PROFILES

SETTINGS = PROFILES["phi2"].generation


def batches(tokenizer, rows: int, device) -> list[dict[str, torch.Tensor]]:
    """Two left-padded batches of `rows` prompts each, consecutive in length order from the middle of 500."""
    prompts = encode_prompts(tokenizer, SETTINGS.template, synthetic_articles(bench.MERGED_ARTICLES),
                             SETTINGS.max_prompt_tokens)
    ordered = sorted(prompts, key=len)
    middle = len(ordered) // 2 - rows
    return [generate.left_padded(ordered[start:start + rows], tokenizer.pad_token_id, device)
            for start in (middle, middle + rows)]


class Batch:
    """One batch's prefill and decoding, run as `static_decoding.greedy_static` runs them, separately."""

    def __init__(self, model, padded: dict[str, torch.Tensor], stops: torch.Tensor):
        self.model, self.ids, self.mask, self.stops = model, padded["input_ids"], padded["attention_mask"], stops
        self.cache_length = batch_planning.cache_length(self.ids.shape[1], SETTINGS.max_new_tokens)

    def prefill(self) -> None:
        self.cache, self.lengths, self.first_ids = static_decoding.prefilled(
            self.model, self.ids, self.mask, self.cache_length, self.stops, static_decoding.PREFILL_CHUNK_TOKENS)

    def decode(self) -> None:
        static_decoding._decode(self.model, self.first_ids, self.mask, self.lengths, self.cache, self.cache_length,
                                SETTINGS.max_new_tokens, self.stops, cuda_graph=True, attend_filled=True)


def timed(fn) -> float:
    torch.cuda.synchronize()
    started = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - started


def both_at_once(decoding: Batch, prefilling: Batch) -> dict[str, float]:
    """`decoding` decodes on the default stream; once its step is recorded, a thread prefills `prefilling` on a
    side stream. Seconds from the start of decoding to the end of each."""
    recorded, ends, side = threading.Event(), {}, torch.cuda.Stream()
    record = static_decoding._recorded

    def recording(step):
        replay = record(step)
        recorded.set()
        return replay

    def prefill_beside() -> None:
        if not recorded.wait(timeout=60):  # the step could not be recorded: nothing to run beside
            return
        with torch.inference_mode(), torch.cuda.stream(side):
            prefilling.prefill()
            side.synchronize()
        ends["prefill"] = time.perf_counter()

    thread = threading.Thread(target=prefill_beside)
    torch.cuda.synchronize()
    with unittest.mock.patch.object(static_decoding, "_recorded", recording):
        started = time.perf_counter()
        thread.start()
        decoding.decode()
        torch.cuda.current_stream().synchronize()
        ends["decoding"] = time.perf_counter()
        thread.join()
    return {name: end - started for name, end in ends.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args()
    sys.setswitchinterval(0.0005)  # the decoding thread needs the GIL for a few launches a step
    spec, model_dir, tokenizer = bench.phi2_shape_checkpoint()
    model = generate.load_merged_bf16(dataclasses.replace(spec, load_in_4bit=False), model_dir, None)
    stops = torch.tensor(generate.stop_token_ids(tokenizer, model), device=model.device)
    first, second = (Batch(model, padded, stops) for padded in batches(tokenizer, args.rows, model.device))
    results = []
    with torch.inference_mode(), speedups.for_generation(model, True), filled_columns.applied(model):
        first.prefill()
        first.decode()  # the first calls' costs, out of the timings
        for _ in range(args.rounds):
            first.prefill()
            alone = {"decoding": timed(first.decode), "prefill": timed(second.prefill)}
            first.prefill()
            together = both_at_once(first, second)
            entry = {"rows": args.rows, "cache_columns": first.cache_length,
                     "alone_s": {name: round(s, 3) for name, s in alone.items()},
                     "together_s": {name: round(s, 3) for name, s in together.items()},
                     "together_against_alone": round(max(together.values()) / sum(alone.values()), 3)}
            print(json.dumps(entry), flush=True)
            results.append(entry)
    if args.output:
        args.output.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
