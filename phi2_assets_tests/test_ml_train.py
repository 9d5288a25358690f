"""`train_lora` on the tiny random Phi: real SFTTrainer steps, real checkpoints, real adapter files."""

import dataclasses
import json

import datasets
import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from phi2_assets.ml import models
from phi2_assets.ml.train import (
    TARGET_MODULES_BY_ARCHITECTURE,
    TrainSettings,
    expected_trainable_parameters,
    resolve_optimizer,
    train_lora,
)
from phi2_assets_tests.conftest import tiny_training_set

FAST = TrainSettings(
    lora_r=4, lora_alpha=8, lora_dropout=0.0, learning_rate=1e-3, epochs=1, max_steps=3, per_device_batch_size=4,
    gradient_accumulation_steps=1, optimizer="adamw_torch", lr_scheduler="constant", warmup_ratio=0.0,
    gradient_checkpointing=False, logging_steps=1, save_steps=2,
)


@pytest.fixture(scope="module")
def tiny():
    """(model, tokenizer, train, validation): the tiny Phi and 16 + 8 tokenized sample pairs."""
    return tiny_training_set()


def test_trains_saves_adapter_and_leaves_base_model_untouched(tiny, tmp_path):
    model, tokenizer, train, validation = tiny
    probe = torch.tensor([train[0]["input_ids"][:32]])
    with torch.no_grad():
        logits_before = model(probe).logits.clone()
    lines: list[str] = []

    artifact = train_lora(
        model, tokenizer, train, validation, FAST, tmp_path / "adapter", tmp_path / "checkpoints", lines.append
    )

    assert artifact.steps == 3 and artifact.resumed_from_step == 0
    assert artifact.train_loss_steps == [1, 2, 3] and all(torch.isfinite(torch.tensor(artifact.train_losses)))
    assert artifact.tokens_seen > 0 and artifact.tokens_per_second > 0 and artifact.adapter_bytes > 0
    assert any("tokens/s" in line and "ETA" in line for line in lines)
    assert {"adapter_model.safetensors", "adapter_config.json", "tokenizer.json"} <= {
        p.name for p in (tmp_path / "adapter").iterdir()
    }
    assert not any((tmp_path / "checkpoints").iterdir()), "checkpoints are removed once the adapter is saved"
    # the shared base model comes back as it was: no LoRA layers, original forward, same outputs
    assert type(model).__name__ == "PhiForCausalLM" and "forward" not in model.__dict__
    assert not any("lora" in name for name, _ in model.named_parameters())
    assert not model.training and not model.is_activation_checkpointing
    with torch.no_grad():
        assert torch.equal(model(probe).logits, logits_before)

    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model.name_or_path), artifact.path)
    loaded = sum(p.numel() for name, p in adapted.named_parameters() if "lora_" in name)
    assert (
        loaded
        == artifact.trainable_parameters
        == expected_trainable_parameters(model, TARGET_MODULES_BY_ARCHITECTURE["phi"], 4)
    )
    with torch.no_grad():
        assert not torch.equal(adapted(probe).logits, logits_before), "the adapter changes the model"


def test_eval_loss_falls_when_overfitting_a_repeated_set(tiny, tmp_path):
    model, tokenizer, train, _ = tiny
    repeated = datasets.concatenate_datasets([train.select(range(4))] * 8)
    settings = dataclasses.replace(
        FAST, lora_r=8, lora_alpha=16, learning_rate=2e-2, max_steps=8, logging_steps=4, save_steps=100
    )
    artifact = train_lora(
        model, tokenizer, repeated, train.select(range(4)), settings, tmp_path / "adapter", tmp_path / "checkpoints"
    )
    # a random model starts at the uniform distribution's loss, ln(2048) = 7.62
    assert artifact.eval_loss < artifact.base_eval_loss - 0.2, (artifact.base_eval_loss, artifact.eval_loss)
    assert artifact.train_losses[-1] < artifact.train_losses[0]


def test_padding_to_a_multiple_changes_nothing_learned(tiny, tmp_path):
    """The phi2 profile pads batches to a multiple of 64 (few shapes for CUDA attention kernels): the extra positions
    are masked and unlabelled, so losses and counted tokens stay those of padding to the longest row."""
    model, tokenizer, train, validation = tiny
    settings = dataclasses.replace(FAST, max_steps=2, save_steps=100)
    longest = train_lora(model, tokenizer, train, validation, settings, tmp_path / "a", tmp_path / "checkpoints")
    padded = train_lora(
        model,
        tokenizer,
        train,
        validation,
        dataclasses.replace(settings, pad_to_multiple_of=64),
        tmp_path / "b",
        tmp_path / "checkpoints",
    )
    assert padded.train_losses == pytest.approx(longest.train_losses, rel=1e-4)
    assert padded.eval_loss == pytest.approx(longest.eval_loss, rel=1e-4)
    assert padded.tokens_seen == longest.tokens_seen


def test_dataloader_workers_train_and_evaluate_on_the_same_batches(tiny, tmp_path):
    """Batches fetched by worker processes are the training process's own: the same losses, and the same held-out
    batches at every evaluation (a kept evaluation loader would regroup them)."""
    model, tokenizer, train, validation = tiny
    settings = dataclasses.replace(FAST, max_steps=3, save_steps=100, group_by_length=True, lora_dropout=0.1)
    in_process = train_lora(
        model, tokenizer, train, validation, settings, tmp_path / "in_process", tmp_path / "checkpoints"
    )
    workers = train_lora(
        model,
        tokenizer,
        train,
        validation,
        dataclasses.replace(settings, dataloader_workers=2),
        tmp_path / "workers",
        tmp_path / "checkpoints",
    )
    assert workers.train_losses == in_process.train_losses
    assert (workers.base_eval_loss, workers.eval_loss) == (in_process.base_eval_loss, in_process.eval_loss)


def test_interrupted_run_resumes_from_its_checkpoint(tiny, tmp_path):
    model, tokenizer, train, validation = tiny
    settings = dataclasses.replace(
        FAST, max_steps=4, save_steps=2, logging_steps=3
    )  # checkpoint-2 is saved between log lines
    with pytest.raises(KeyboardInterrupt):
        train_lora(
            model,
            tokenizer,
            train,
            validation,
            settings,
            tmp_path / "adapter",
            tmp_path / "checkpoints",
            _interrupt_at_step_3,
        )
    assert not (tmp_path / "adapter").exists(), "an interrupted run writes no adapter"
    assert "forward" not in model.__dict__ and not any("lora" in n for n, _ in model.named_parameters())

    changed = train_lora(
        model,
        tokenizer,
        train,
        validation,
        dataclasses.replace(settings, max_steps=1),
        tmp_path / "other",
        tmp_path / "checkpoints",
    )
    assert changed.resumed_from_step == 0, "another configuration never resumes this run's checkpoint"

    lines: list[str] = []
    artifact = train_lora(
        model, tokenizer, train, validation, settings, tmp_path / "adapter", tmp_path / "checkpoints", lines.append
    )
    assert artifact.resumed_from_step == 2 and artifact.steps == 4
    # 4 steps of 4 rows are one epoch: the tokens counted before the checkpoint and after the resume are every row's
    assert artifact.tokens_seen == sum(len(ids) for ids in train["input_ids"])
    assert any(line.startswith("resuming from") and "checkpoint-2" in line for line in lines)


def _interrupt_at_step_3(line: str) -> None:
    """An `on_log` that stops the run the way a kill would, after checkpoint-2 was saved."""
    if line.startswith("step 3/"):
        raise KeyboardInterrupt("interrupted at step 3")


def test_lora_on_upper_layers_only_adapts_those_layers(tiny, tmp_path):
    model, tokenizer, train, validation = tiny
    settings = dataclasses.replace(FAST, max_steps=2, layers_to_transform=(1,))
    artifact = train_lora(model, tokenizer, train, validation, settings, tmp_path / "adapter", tmp_path / "checkpoints")
    every_layer = expected_trainable_parameters(model, TARGET_MODULES_BY_ARCHITECTURE["phi"], 4)
    assert artifact.trainable_parameters == every_layer // 2  # two identical layers, one adapted
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model.name_or_path), artifact.path)
    lora_layers = {name.split(".layers.")[1].split(".")[0] for name, _ in adapted.named_parameters() if "lora_" in name}
    assert lora_layers == {"1"}
    assert artifact.eval_loss != artifact.base_eval_loss, "the upper layer learned"


def test_settings_reject_impossible_values():
    for bad in (
        {"learning_rate": 0},
        {"lora_r": 0},
        {"lora_dropout": 1.0},
        {"max_steps": 0},
        {"lr_scheduler": "sine"},
        {"pad_to_multiple_of": 0},
        {"compile_layers": True, "gradient_checkpointing": True},
        {"dataloader_workers": -1},
        {"compile_layers": True, "speedups": False},
        {"layers_to_transform": (-1,)},
    ):
        with pytest.raises(ValueError):
            TrainSettings(**bad)


def test_unknown_target_module_fails_instead_of_training_less(tiny):
    model = tiny[0]
    with pytest.raises(ValueError, match="o_proj"):
        expected_trainable_parameters(model, ("q_proj", "o_proj"), 4)


def test_optimizer_rule_bitsandbytes_only_on_cuda():
    assert resolve_optimizer("paged_adamw_8bit", "cpu") == "adamw_torch"
    assert resolve_optimizer("paged_adamw_8bit", "cuda") == "paged_adamw_8bit"
    assert resolve_optimizer("adamw_torch", "cpu") == "adamw_torch"


def test_cpu_precision_rule():
    assert models.choose_precision(True, cuda_available=False, cpu_bf16=False).dtype == torch.float32
    assert models.choose_precision(True, cuda_available=False, cpu_bf16=True).dtype == torch.bfloat16
    assert not models.choose_precision(True, cuda_available=False, cpu_bf16=True).quantized_4bit
    assert models.choose_precision(True, cuda_available=True).quantized_4bit
    # cpu_dtype overrides the CPU's native bf16 either way; CUDA keeps its rule
    assert models.choose_precision(False, False, cpu_bf16=True, cpu_dtype="float32").dtype == torch.float32
    assert models.choose_precision(False, False, cpu_bf16=False, cpu_dtype="bfloat16").dtype == torch.bfloat16
    assert models.choose_precision(True, cuda_available=True, cpu_dtype="float32").quantized_4bit
    with pytest.raises(ValueError, match="cpu_dtype"):
        models.ModelSpec(cpu_dtype="fp16")


def test_settings_documented_for_the_launchpad():
    undocumented = [f.name for f in dataclasses.fields(TrainSettings) if not f.metadata.get("doc")]
    assert not undocumented
    json.dumps(dataclasses.asdict(TrainSettings()))
