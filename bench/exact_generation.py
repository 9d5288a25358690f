"""Which dense evaluation path computes what was trained: 4-bit + LoRA against the dense bf16 copy of the NF4 weights
with the adapter unmerged (LoRA layers beside the weights) and merged into them, all on the phi2 profile's static
cache with CUDA-graphed steps. Same articles, same trained adapter; summaries compared text for text with 4-bit +
LoRA, and next-token log-probs teacher-forced over the first prompts.

On a CUDA machine, from the repository root with the project's dependencies installed, after a
bench/gpu_benchmark.py run on the same machine has trained its adapter under BENCH_DIR:

    PYTHONPATH=. python bench/exact_generation.py [--adapter DIR] [--articles 256] [--output-dir data/bench]

Writes <output-dir>/h200-exact-generation.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json

from peft import PeftModel

from bench import gpu_benchmark as bench
from bench import gpu_metrics
from bench.phi2_shape import synthetic_articles
from phi2_assets.ml import generate, models
from phi2_assets.profiles import PROFILES

PATHS = ("4bit_lora", "bf16_lora", "bf16_merged")  # the first is the reference


def load(path: str, spec, model_dir: str, adapter: str):
    if path == "bf16_merged":
        return generate.load_merged_bf16(spec, model_dir, adapter)
    # the adapter as LoRA layers, beside the 4-bit weights or beside their dense bf16 copy
    if path == "4bit_lora":
        base = models.load_model(spec, model_dir, models.choose_precision(True))
    else:
        base = generate.load_merged_bf16(spec, model_dir, None)
    return PeftModel.from_pretrained(base, adapter)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapter", default=str(bench.WORK / "adapter-best"))
    parser.add_argument("--articles", type=int, default=bench.UNMERGED_ARTICLES)
    gpu_metrics.add_common_arguments(parser)
    args = parser.parse_args()
    bench.OUTPUT_DIR = args.output_dir
    spec, model_dir, tokenizer = bench.phi2_shape_checkpoint()
    articles = synthetic_articles(args.articles)
    settings = dataclasses.replace(PROFILES["phi2"].generation, merged_bf16=False)  # static cache, graphed steps
    probes = bench.teacher_forcing_probes(tokenizer, articles, settings)
    report: dict = {"commit": gpu_metrics.commit(args.commit), "articles": len(articles), "adapter": args.adapter,
                    "paths": {}}
    texts, reference = {}, None
    for path in PATHS:
        model = load(path, spec, model_dir, args.adapter)
        logprobs = bench.next_token_logprobs(model, probes)
        passes = [generate.generate_summaries(model, tokenizer, articles, settings) for _ in range(2)]
        texts[path] = [record.text for record in passes[0].records]
        repeated = sum(a.text == b.text for a, b in zip(*(p.records for p in passes), strict=True))
        entry = {"per_s": [round(p.summaries_per_second, 1) for p in passes], "batches": passes[0].batch_sizes,
                 "nonempty": passes[0].success_rate, "same_as_second_pass": repeated / len(articles)}
        if reference is None:
            reference = logprobs
        else:
            identical = sum(a == b for a, b in zip(texts[PATHS[0]], texts[path], strict=True))
            entry["identical_to_4bit_lora"] = identical / len(articles)
            entry["logprobs_vs_4bit_lora"] = bench.compare_logprobs(reference, logprobs)
        report["paths"][path] = entry
        print(f"[{path}] {json.dumps(entry)}", flush=True)
        del model, logprobs, passes
        bench.free_memory()
    (args.output_dir / "h200-exact-generation.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
