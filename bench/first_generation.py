"""Generation as an evaluation asset's fresh process meets it: several passes over the same 500 articles on the
phi-2-shaped merged bf16 model with the phi2 profile's settings, optionally without cuDNN attention (which plans
each new shape on the host). The first pass pays every one-time cost; later passes show the steady state.
`--unmerged` times the 4-bit model's path instead (`merged_bf16: false`: dynamic cache, 256 articles), with `--lora`
through a fresh LoRA of the phi2 recipe's shape (the cost of a trained one), and with `--static` on the static cache
with CUDA-graphed steps, as the phi2 profile runs it with `merged_bf16: false`. `--prefill-pass` ends with one pass
of a single new token (the prefill's time).

    PYTHONPATH=/tmp/site:. python3 bench/first_generation.py [--without-cudnn] [--unmerged [--lora] [--static]]
        [--passes 3] [--prefill-pass]

Writes $OUT/h200-first-generation-<label>.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json

from bench import gpu_benchmark as bench
from bench.phi2_shape import synthetic_articles
from phi2_assets.ml import generate, models
from phi2_assets.ml.train import target_modules_for
from phi2_assets.profiles import PROFILES


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--without-cudnn", action="store_true")
    parser.add_argument("--unmerged", action="store_true")
    parser.add_argument("--lora", action="store_true")
    parser.add_argument("--static", action="store_true")
    parser.add_argument("--passes", type=int, default=3)
    parser.add_argument("--prefill-pass", action="store_true")
    args = parser.parse_args()
    spec, model_dir, tokenizer = bench.phi2_shape_checkpoint()
    settings, articles = PROFILES["phi2"].generation, synthetic_articles(bench.MERGED_ARTICLES)
    if args.unmerged:
        model = models.load_model(spec, model_dir, models.choose_precision(True))
        if args.lora:
            from peft import LoraConfig, get_peft_model

            recipe = PROFILES["phi2"].train
            model = get_peft_model(model, LoraConfig(r=recipe.lora_r, lora_alpha=recipe.lora_alpha, lora_dropout=recipe.lora_dropout,
                                                     target_modules=list(target_modules_for(model, recipe))))
        settings, articles = bench.UNMERGED_GENERATION, articles[: bench.UNMERGED_ARTICLES]
        if args.static:
            settings = dataclasses.replace(settings, cache="static")
    else:
        model = generate.load_merged_bf16(spec, model_dir, None)
    label = "-".join(["without-cudnn" if args.without_cudnn else "default"] + (["unmerged"] if args.unmerged else [])
                     + (["lora"] if args.lora else []) + (["static"] if args.unmerged and args.static else []))
    passes = []
    runs = [settings] * args.passes + ([dataclasses.replace(settings, max_new_tokens=1)] if args.prefill_pass else [])
    for index, chosen in enumerate(runs):
        with bench.sdpa_backends(bench.WITHOUT_CUDNN if args.without_cudnn else None):
            result = generate.generate_summaries(model, tokenizer, articles, chosen)
        passes.append({"pass": index + 1, "new_tokens": chosen.max_new_tokens, "per_s": round(result.summaries_per_second, 2), "seconds": round(result.seconds, 2),
                       "batches": result.batch_sizes, "batch_seconds": [round(s, 3) for s in result.batch_seconds],
                       "nonempty_rate": result.success_rate})
        print(f"[{label}] {json.dumps(passes[-1])}", flush=True)
    (bench.OUT / f"h200-first-generation-{label}.json").write_text(json.dumps({"sdpa": label, "passes": passes}, indent=1))


if __name__ == "__main__":
    main()
