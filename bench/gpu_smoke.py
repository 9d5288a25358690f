"""First GPU call: does the stack work there, and which training levers pay? (bench/NOTES-gpu.md has the results)

Environment and ceilings, the phi-2-shaped model through the project's 4-bit loader, plain PyTorch QLoRA steps
for the levers (activation function, checkpointing, padding vs padding-free, attention kernel), then a short run
of the project's `train_lora` and `generate_summaries` to prove they work on the device's stack.

    PYTHONPATH=/tmp/site:. python3 bench/gpu_smoke.py      (on the GPU machine; writes $OUT/smoke.json)
"""

from __future__ import annotations

import json
import os
import time
import traceback
from pathlib import Path

import numpy as np
import torch

from bench import gpu_metrics
from bench.phi2_shape import EOS_ID, save_phi2_shape, synthetic_articles, synthetic_tokenized_xsum, xsum_lengths
from phi2_assets.ml.models import ModelSpec, choose_precision, load_model
from phi2_assets.ml.train import TARGET_MODULES_BY_ARCHITECTURE

OUT = Path(os.environ.get("OUT", "/tmp/out"))
MODEL_DIR = Path("/tmp/phi2-shape")
PHI_TARGETS = list(TARGET_MODULES_BY_ARCHITECTURE["phi"])
results: dict = {}


def record(key: str, value) -> None:
    results[key] = value
    print(f"[{key}] {value}", flush=True)
    (OUT / "smoke.json").write_text(json.dumps(results, indent=1, default=str))


def guarded(name: str, fn):
    try:
        return fn()
    except Exception as error:  # noqa: BLE001 — a smoke test reports every failure and goes on
        traceback.print_exc()
        record(f"{name}_error", f"{type(error).__name__}: {error}"[:500])
        return None


def batches(rng: np.random.Generator) -> dict[str, dict]:
    """Fixed-length batches like the issue's table, and one XSum-shaped batch of 16 padded vs packed."""
    def fixed(rows: int, length: int = 512) -> dict:
        ids = torch.randint(1, 50_000, (rows, length))
        labels = torch.full_like(ids, -100)
        labels[:, -30:] = ids[:, -30:]
        return {"input_ids": ids, "labels": labels, "lengths": [length] * rows}

    lengths = [int(n) for n in xsum_lengths(16, rng)]
    longest = max(lengths)
    padded_ids = torch.full((16, longest), EOS_ID)
    padded_labels = torch.full((16, longest), -100)
    mask = torch.zeros((16, longest), dtype=torch.long)
    packed_ids, packed_labels, positions = [], [], []
    for row, n in enumerate(lengths):
        ids = torch.randint(1, 50_000, (n,))
        labels = torch.full_like(ids, -100)
        labels[-30:] = ids[-30:]
        padded_ids[row, :n], padded_labels[row, :n], mask[row, :n] = ids, labels, 1
        packed_ids.append(ids)
        packed_labels.append(torch.cat([torch.tensor([-100]), labels[1:]]))  # no loss across a boundary
        positions.append(torch.arange(n))
    return {
        "fixed2": fixed(2),
        "fixed16": fixed(16),
        "fixed32": fixed(32),
        "padded16": {"input_ids": padded_ids, "labels": padded_labels, "attention_mask": mask, "lengths": lengths},
        "packed16": {
            "input_ids": torch.cat(packed_ids)[None], "labels": torch.cat(packed_labels)[None],
            "position_ids": torch.cat(positions)[None], "lengths": lengths,
        },
    }


def lever_probe(model) -> None:
    """Plain QLoRA steps (LoRA r16 on the six Phi projections, paged AdamW 8-bit) over the levers."""
    import bitsandbytes as bnb
    from peft import LoraConfig, get_peft_model
    from transformers.activations import ACT2FN

    peft_model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules=PHI_TARGETS, task_type="CAUSAL_LM"))
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    for p in trainable:
        p.data = p.data.to(torch.bfloat16)  # as TRL does for a quantized base
    lora_count = sum(p.numel() for p in trainable)
    record("lora_trainable", lora_count)
    optimizer = bnb.optim.PagedAdamW8bit(trainable, lr=2e-4)
    base = peft_model.base_model.model
    layers = base.model.layers
    data = batches(np.random.default_rng(0))
    dropouts = {name: module.lora_dropout["default"] for name, module in peft_model.named_modules() if hasattr(module, "lora_dropout")}

    def configure(act: str, checkpointing: bool, attention: str, lora_dropout: bool) -> None:
        for layer in layers:
            layer.mlp.activation_fn = ACT2FN[act]
        if checkpointing:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        elif base.is_gradient_checkpointing:
            base.gradient_checkpointing_disable()
        if base.config._attn_implementation != attention:
            base.set_attn_implementation(attention)
        for name, module in peft_model.named_modules():
            if name in dropouts:
                module.lora_dropout["default"] = dropouts[name] if lora_dropout else torch.nn.Identity()

    def run(name: str, batch_name: str, act="gelu_new", checkpointing=False, attention="sdpa", lora_dropout=True, steps=3):
        configure(act, checkpointing, attention, lora_dropout)
        batch = {k: v.cuda() for k, v in data[batch_name].items() if k != "lengths"}
        lengths = data[batch_name]["lengths"]
        peft_model.train()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        times = []
        for step in range(steps + 1):
            started = time.perf_counter()
            loss = peft_model(**batch).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - started)
        seconds = float(np.median(times[1:]))
        flops = gpu_metrics.train_flops(base.config, lengths, lora_count)
        record(f"lever {name}", {
            "tok_s": round(sum(lengths) / seconds), "mfu": round(gpu_metrics.mfu(flops, seconds), 3),
            "peak_gib": gpu_metrics.gib(torch.cuda.max_memory_allocated()), "step_s": round(seconds, 3), "first_step_s": round(times[0], 2),
            "loss": round(float(loss), 3), "tokens": sum(lengths),
        })

    variants = [
        ("seed mb2 ckpt gelu_new", "fixed2", dict(checkpointing=True)),
        ("mb16 gelu_new", "fixed16", {}),
        ("mb16 gelu_tanh", "fixed16", dict(act="gelu_pytorch_tanh")),
        ("mb16 gelu_tanh no-lora-dropout", "fixed16", dict(act="gelu_pytorch_tanh", lora_dropout=False)),
        ("mb16 gelu_tanh ckpt", "fixed16", dict(act="gelu_pytorch_tanh", checkpointing=True)),
        ("mb32 gelu_tanh ckpt", "fixed32", dict(act="gelu_pytorch_tanh", checkpointing=True)),
        ("xsum16 padded gelu_tanh", "padded16", dict(act="gelu_pytorch_tanh")),
        ("xsum16 packed sdpa gelu_tanh", "packed16", dict(act="gelu_pytorch_tanh")),
        ("xsum16 padded gelu_tanh ckpt", "padded16", dict(act="gelu_pytorch_tanh", checkpointing=True)),
        ("xsum16 packed flex gelu_tanh", "packed16", dict(act="gelu_pytorch_tanh", attention="flex_attention", steps=4)),
    ]
    for name, batch_name, options in variants:
        guarded(f"lever {name}", lambda: run(name, batch_name, **options))
        torch.cuda.empty_cache()
    configure("gelu_new", False, "sdpa", True)
    peft_model.unload()
    for p in base.parameters():
        p.requires_grad_(False)
    del optimizer
    torch.cuda.empty_cache()


def project_training(model, tokenizer) -> None:
    from phi2_assets.ml.train import TrainSettings, train_lora

    data = synthetic_tokenized_xsum(160 + 16)
    train, evaluation = data.select(range(160)), data.select(range(160, 176))
    for label, settings in [
        ("seed", TrainSettings(max_steps=2, save_steps=1_000, logging_steps=1)),
        ("mb16", TrainSettings(max_steps=3, per_device_batch_size=16, gradient_accumulation_steps=1,
                               gradient_checkpointing=False, save_steps=1_000, logging_steps=1)),
    ]:
        def train_once(settings=settings, label=label):
            started = time.perf_counter()
            artifact = train_lora(model, tokenizer, train, evaluation, settings, Path(f"/tmp/adapter-{label}"), Path("/tmp/ckpt"), on_log=print)
            record(f"train_lora {label}", {
                "tok_s": round(artifact.tokens_per_second), "s_per_step": round(artifact.seconds_per_step, 2),
                "peak_gib": round(artifact.peak_memory_mb / 1024, 2), "losses": artifact.train_losses,
                "eval": [artifact.base_eval_loss, artifact.eval_loss], "wall_s": round(time.perf_counter() - started, 1),
            })
        guarded(f"train_lora {label}", train_once)
        torch.cuda.empty_cache()


def project_generation(model, tokenizer) -> None:
    from phi2_assets.ml.generate import GenerationSettings, generate_summaries

    articles = synthetic_articles(256)
    for label, chosen, settings in [
        ("one at a time", articles[:2], GenerationSettings(batch_size=1)),
        ("auto batch dynamic", articles[:256], GenerationSettings()),
        ("batch 256 static", articles[:256], GenerationSettings(batch_size=256, cache="static")),
    ]:
        def generate_once(chosen=chosen, settings=settings, label=label):
            torch.cuda.reset_peak_memory_stats()
            result = generate_summaries(model, tokenizer, chosen, settings)
            record(f"generate {label}", {
                "per_s": round(result.summaries_per_second, 3), "success": result.success_rate, "batch": result.batch_size,
                "seconds": round(result.seconds, 2), "peak_gib": gpu_metrics.gib(torch.cuda.max_memory_allocated()),
                "new_tokens": float(np.mean([r.new_tokens for r in result.records])), "sample": result.records[0].text[:60],
            })
        guarded(f"generate {label}", generate_once)


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    from transformers import PreTrainedModel, TrainingArguments

    record("environment", gpu_metrics.environment())
    record("api", {
        "activation_checkpointing_disable": hasattr(PreTrainedModel, "activation_checkpointing_disable"),
        "train_sampling_strategy": "train_sampling_strategy" in TrainingArguments.__dataclass_fields__,
    })
    guarded("trl", lambda: record("trl_import", __import__("trl").SFTTrainer.__name__))
    record("peak_bf16_tflops", round(gpu_metrics.measure_peak_bf16() / 1e12, 1))
    started = time.perf_counter()
    save_phi2_shape(MODEL_DIR)
    record("build_s", round(time.perf_counter() - started, 1))
    started = time.perf_counter()
    spec = ModelSpec(source="local", name_or_path=str(MODEL_DIR), load_in_4bit=True)
    model = load_model(spec, str(MODEL_DIR), choose_precision(True))
    from phi2_assets.ml.models import load_tokenizer

    tokenizer = load_tokenizer(spec, str(MODEL_DIR))
    record("load_4bit", {"seconds": round(time.perf_counter() - started, 1), "allocated_gib": gpu_metrics.gib(torch.cuda.memory_allocated()),
                         "is_4bit": bool(getattr(model, "is_loaded_in_4bit", False)), "fc1": type(model.model.layers[0].mlp.fc1).__name__})
    guarded("lever_probe", lambda: lever_probe(model))
    guarded("project_training", lambda: project_training(model, tokenizer))
    guarded("project_generation", lambda: project_generation(model, tokenizer))
    print("\n".join(f"{k}: {v}" for k, v in results.items() if k.startswith(("lever", "train_lora", "generate", "peak"))))


if __name__ == "__main__":
    main()
