"""LoRA fine-tuning of the base model with TRL's `SFTTrainer`, read top-down like TRL's `sft.py`:
data -> PEFT config -> trainer -> evaluate / train / evaluate -> save -> artifact.

The dataset comes from `tokenization.tokenize_dataset`: `input_ids` and `labels` with -100 on the prompt. TRL keeps a
`labels` column as is, so the loss is on the summary alone. `train_lora` is a plain function: the asset calls it,
and so do the benchmarks and tests. The speed-ups (`phi2_assets.ml.speedups`) wrap the trainer's run when the
settings' `speedups` is on; with it off this is TRL, transformers and PEFT as shipped.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import re
import resource
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import datasets
import numpy as np
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import PreTrainedModel, PreTrainedTokenizerBase, PrinterCallback, TrainerCallback, set_seed
from transformers.trainer_utils import get_last_checkpoint
from trl import SFTConfig, SFTTrainer

from phi2_assets.ml import models, speedups
from phi2_assets.ml.atomic import atomic_path
from phi2_assets.ml.settings import documented

log = logging.getLogger(__name__)

# The linear layers LoRA adapts, by `config.model_type`: every projection of attention and MLP.
TARGET_MODULES_BY_ARCHITECTURE: dict[str, tuple[str, ...]] = {
    "phi": ("q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2"),
    "gemma3_text": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    "gemma3": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
}
# bitsandbytes optimizers need CUDA; on CPU they fall back to this one.
CPU_OPTIMIZER = "adamw_torch"
REPORT_TO = ("none", "mlflow", "tensorboard")
SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup")
ADAPTER_FILES = ("adapter_model.safetensors", "adapter_config.json")


@dataclasses.dataclass(frozen=True)
class TrainSettings:
    """Every knob of the LoRA run; the `phi2` profile holds the seed notebooks' values."""

    lora_r: int = documented("LoRA rank", 16)
    lora_alpha: int = documented("LoRA scaling numerator (scale = alpha / r)", 32)
    lora_dropout: float = documented("dropout on the LoRA input", 0.05)
    layers_to_transform: tuple[int, ...] = documented(
        "decoder layers LoRA adapts, by index; empty = every layer. Upper layers only: the backward pass "
        "stops at the lowest one",
        (),
    )
    target_modules: tuple[str, ...] = documented(
        "linear layers to adapt; empty = by architecture (Phi: q,k,v,dense,fc1,fc2; Gemma: "
        "q,k,v,o,gate,up,down)",
        (),
    )
    learning_rate: float = documented("peak learning rate", 2e-4)
    epochs: float = documented("passes over the training split", 3.0)
    max_steps: int | None = documented("optimizer steps cap (overrides epochs); null = run every epoch", None)
    per_device_batch_size: int = documented("sequences per training forward pass", 2)
    eval_batch_size: int | None = documented(
        "sequences per evaluation forward pass; null = per_device_batch_size. Evaluation keeps no activations for "
        "a backward pass, so larger batches fit and cost fewer passes",
        None,
    )
    gradient_accumulation_steps: int = documented("forward passes per optimizer step", 8)
    optimizer: str = documented(
        "transformers optimizer name; bitsandbytes ones (paged_/8bit) become adamw_torch on CPU",
        "paged_adamw_8bit",
    )
    lr_scheduler: str = documented("learning-rate schedule after warm-up", "cosine")
    warmup_ratio: float = documented("share of the steps spent warming the learning rate up", 0.03)
    gradient_checkpointing: bool = documented(
        "recompute activations in the backward pass: less memory, ~30% more compute",
        True,
    )
    padding_free: bool = documented(
        "one unpadded row per batch; sdpa then masks a block-diagonal O(L^2) matrix, which only pays with "
        "flash-attention",
        False,
    )
    group_by_length: bool = documented(
        "batch sequences of similar length (less padding) instead of a uniformly random order",
        False,
    )
    pad_to_multiple_of: int | None = documented(
        "pad each batch to a multiple of this many positions: few distinct shapes, so CUDA kernels chosen per"
        " shape are reused; null = to the longest row",
        None,
    )
    compile_layers: bool = documented(
        "compile the decoder layers with torch.compile (a speed-up): less Python per step, for a compile in "
        "each process; pays on long GPU runs; not with gradient_checkpointing",
        False,
    )
    cuda_graph: bool = documented(
        "replay each training step's forward and backward pass as a CUDA graph per batch shape (a speed-up): "
        "less Python per step on CUDA; needs one micro-batch per step, no autocast, no activation checkpointing "
        "and no compile_layers, else the steps run eager",
        False,
    )
    lora_dropout_kernel: bool = documented(
        "draw the LoRA input's dropout inside Triton kernels fused with the adapters' first matmul (a speed-up): "
        "one keep bit per element kept for the backward pass instead of a mask and a dropped copy; the same "
        "dropout with other draws than PyTorch's; CUDA with half-precision adapters (a 4-bit model's), with speedups",
        False,
    )
    dataloader_workers: int = documented(
        "processes that fetch and collate the next batches while a step runs; 0 = the training process does "
        "it between steps",
        0,
    )
    bf16: bool = documented(
        "bf16 autocast where the model computes in bf16 (CUDA, CPUs with native bf16); off for an fp32 model",
        True,
    )
    logging_steps: int = documented("optimizer steps between progress lines", 10)
    eval_steps: int | None = documented("optimizer steps between evaluations; null = evaluate at the end only", None)
    save_steps: int = documented(
        "optimizer steps between checkpoints (a re-run with the same config resumes from the last)",
        50,
    )
    seed: int = documented("seed for LoRA initialisation and data order", 42)
    speedups: bool = documented(
        "run the speed-ups of phi2_assets.ml.speedups (same results); false = TRL's SFTTrainer and "
        "transformers as shipped",
        True,
    )
    report_to: str = documented(
        "where step metrics go besides the run log: mlflow (the run's MLflow run, when tracking is on), "
        "tensorboard (under the data dir) or none", "mlflow",
    )

    def __post_init__(self) -> None:
        problems = []
        if self.lora_r < 1:
            problems.append(f"lora_r must be at least 1, got {self.lora_r}")
        if any(layer < 0 for layer in self.layers_to_transform):
            layers = list(self.layers_to_transform)
            problems.append(f"layers_to_transform must hold layer indices (0 or more), got {layers}")
        if self.lora_alpha <= 0:
            problems.append(f"lora_alpha must be positive, got {self.lora_alpha}")
        if not 0 <= self.lora_dropout < 1:
            problems.append(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if not 0 < self.learning_rate < 1:
            problems.append(f"learning_rate must be in (0, 1), got {self.learning_rate}")
        if self.epochs <= 0:
            problems.append(f"epochs must be positive, got {self.epochs}")
        if self.max_steps is not None and self.max_steps < 1:
            problems.append(f"max_steps must be at least 1 (or null), got {self.max_steps}")
        for name in ("per_device_batch_size", "gradient_accumulation_steps", "logging_steps", "save_steps"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.dataloader_workers < 0:
            problems.append(f"dataloader_workers must be 0 or more, got {self.dataloader_workers}")
        if self.eval_batch_size is not None and self.eval_batch_size < 1:
            problems.append(f"eval_batch_size must be at least 1 (or null), got {self.eval_batch_size}")
        if self.pad_to_multiple_of is not None and self.pad_to_multiple_of < 1:
            problems.append(f"pad_to_multiple_of must be at least 1 (or null), got {self.pad_to_multiple_of}")
        if self.eval_steps is not None and self.eval_steps < 1:
            problems.append(f"eval_steps must be at least 1 (or null), got {self.eval_steps}")
        if self.compile_layers and self.gradient_checkpointing:
            # Inductor fails on checkpointed layers ("Node ... was invalid, but is output")
            problems.append("compile_layers does not combine with gradient_checkpointing: choose one")
        if self.compile_layers and not self.speedups:
            problems.append("compile_layers is a speed-up: it needs speedups true")
        if self.lr_scheduler not in SCHEDULERS:
            problems.append(f"lr_scheduler must be one of {SCHEDULERS}, got {self.lr_scheduler!r}")
        if not 0 <= self.warmup_ratio < 1:
            problems.append(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.report_to not in REPORT_TO:
            problems.append(f"report_to must be one of {REPORT_TO}, got {self.report_to!r}")
        if problems:
            raise ValueError("; ".join(problems))


@dataclasses.dataclass(frozen=True)
class AdapterArtifact:
    """The trained adapter: where it lies, what it was trained from, and how training went (`lora_adapter`'s
    value)."""

    path: str
    base_model: str
    target_modules: list[str]
    lora_r: int
    lora_alpha: int
    trainable_parameters: int
    total_parameters: int
    steps: int
    resumed_from_step: int
    final_train_loss: float
    mean_train_loss: float
    eval_loss: float
    base_eval_loss: float
    tokens_seen: int
    tokens_per_second: float
    train_seconds: float
    seconds_per_step: float
    evaluation_seconds: float
    evaluations: int
    peak_memory_mb: float
    peak_memory_kind: str
    adapter_bytes: int
    device: str
    optimizer: str
    train_loss_steps: list[int]
    train_losses: list[float]
    eval_loss_steps: list[int]
    eval_losses: list[float]

    @property
    def trainable_share(self) -> float:
        return self.trainable_parameters / self.total_parameters

    @property
    def perplexity(self) -> float:
        return math.exp(self.eval_loss)

    @property
    def base_perplexity(self) -> float:
        return math.exp(self.base_eval_loss)


def target_modules_for(model: PreTrainedModel, settings: TrainSettings) -> tuple[str, ...]:
    if settings.target_modules:
        return settings.target_modules
    model_type = model.config.model_type
    if model_type not in TARGET_MODULES_BY_ARCHITECTURE:
        raise ValueError(f"no default LoRA target modules for model_type {model_type!r}; set target_modules")
    return TARGET_MODULES_BY_ARCHITECTURE[model_type]


def expected_trainable_parameters(model: PreTrainedModel, target_modules: tuple[str, ...], rank: int,
                                  layers: tuple[int, ...] = ()) -> int:
    """r x (in + out) per adapted linear layer (in `layers` only, when given). Raises when a target name matches no
    linear layer: PEFT would silently adapt fewer layers than asked."""
    expected, matched = 0, set()
    for name, module in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        layer = re.search(r"\.layers\.(\d+)\.", name)
        if layers and not (layer and int(layer.group(1)) in layers):
            continue
        if leaf in target_modules and hasattr(module, "in_features") and hasattr(module, "out_features"):
            expected += rank * (module.in_features + module.out_features)
            matched.add(leaf)
    missing = sorted(set(target_modules) - matched)
    if missing:
        raise ValueError(f"LoRA target modules {missing} match no linear layer of {type(model).__name__}")
    return expected


def resolve_optimizer(name: str, device: str) -> str:
    """The rule: bitsandbytes optimizers (paged_*, *8bit) on CUDA only; on CPU plain AdamW."""
    if device != "cuda" and ("8bit" in name or name.startswith("paged_")):
        return CPU_OPTIMIZER
    return name


def content_fingerprint(*splits: datasets.Dataset) -> str:
    """Hash of every sequence and label, so a checkpoint resumes only on the very data it was trained on."""
    digest = hashlib.sha256()
    for split in splits:
        for ids, labels in zip(split["input_ids"], split["labels"], strict=True):
            digest.update(np.asarray([len(ids)], np.int64).tobytes())
            digest.update(np.asarray(ids, np.int64).tobytes())
            digest.update(np.asarray(labels, np.int64).tobytes())
    return digest.hexdigest()


class ProgressCallback(TrainerCallback):
    """One line every `logging_steps`: step, loss, learning rate, tokens/s, ETA; and one per evaluation."""

    def __init__(self, say: Callable[[str], None]):
        self.say = say
        self.start: tuple[float, int, int] | None = None  # (time, step, tokens) at the first step this process runs

    def on_step_begin(self, args, state, control, **kwargs):
        if self.start is None:  # on_train_begin fires before a checkpoint's state is restored
            self.start = (time.monotonic(), state.global_step, state.num_input_tokens_seen)

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = logs or {}
        if "loss" in logs and self.start is not None:
            started, first_step, first_tokens = self.start
            elapsed = time.monotonic() - started
            done = max(state.global_step - first_step, 1)
            eta = elapsed / done * (state.max_steps - state.global_step)
            tokens_per_second = (state.num_input_tokens_seen - first_tokens) / max(elapsed, 1e-9)
            self.say(
                f"step {state.global_step}/{state.max_steps}  loss {logs['loss']:.4f}"
                f"  lr {logs.get('learning_rate', 0.0):.2e}"
                f"  {tokens_per_second:,.0f} tokens/s  ETA {eta / 60:.1f} min"
            )
        elif "eval_loss" in logs and state.global_step > 0:  # step 0 is the base model, reported by train_lora
            self.say(f"step {state.global_step}: eval loss {logs['eval_loss']:.4f}")


def _sft_config(settings: TrainSettings, checkpoint_dir: Path, model: PreTrainedModel,
                say: Callable[[str], None]) -> SFTConfig:
    device = model.device.type
    optimizer = resolve_optimizer(settings.optimizer, device)
    if optimizer != settings.optimizer:
        say(f"optimizer {optimizer}: {settings.optimizer} needs CUDA (bitsandbytes)")
    compute_bf16 = model.dtype == torch.bfloat16 or bool(getattr(model, "is_loaded_in_4bit", False))
    return SFTConfig(
        output_dir=str(checkpoint_dir),
        num_train_epochs=settings.epochs,
        max_steps=settings.max_steps or -1,
        per_device_train_batch_size=settings.per_device_batch_size,
        per_device_eval_batch_size=settings.eval_batch_size or settings.per_device_batch_size,
        gradient_accumulation_steps=settings.gradient_accumulation_steps,
        learning_rate=settings.learning_rate,
        lr_scheduler_type=settings.lr_scheduler,
        warmup_steps=settings.warmup_ratio,  # a float below 1 is a share of the steps
        optim=optimizer,
        gradient_checkpointing=settings.gradient_checkpointing,
        padding_free=settings.padding_free,
        pad_to_multiple_of=settings.pad_to_multiple_of,
        train_sampling_strategy="group_by_length" if settings.group_by_length else "random",
        bf16=settings.bf16 and compute_bf16,
        logging_steps=settings.logging_steps,
        eval_strategy="steps" if settings.eval_steps else "no",
        eval_steps=settings.eval_steps,
        save_strategy="steps",
        save_steps=settings.save_steps,
        save_total_limit=2,
        seed=settings.seed,
        # sequences are already cut to the tokenize step's max_length; TRL's default 1024 would cut summaries
        max_length=None,
        prediction_loss_only=True,  # evaluation needs the loss only: no full-vocabulary logits
        include_num_input_tokens_seen="non_padding",
        # a NaN or infinite loss is logged as it is, and no step waits for the GPU to test for one
        logging_nan_inf_filter=False,
        disable_tqdm=True,
        # the caller passes the reporting callbacks `settings.report_to` asks for: transformers' own would configure
        # themselves from environment variables and write under output_dir, which is deleted after training
        report_to="none",
        use_cpu=device != "cuda",
        dataloader_pin_memory=device == "cuda",
        # not persistent: Trainer would keep the evaluation loader, whose length-grouped sampler then splits the
        # held-out rows into other batches at each evaluation (another mean loss from the same weights)
        dataloader_num_workers=settings.dataloader_workers,
        # under DDP (launched training) every LoRA weight takes part in every step: no per-step search for unused ones
        ddp_find_unused_parameters=False,
    )


def _fingerprint(model: PreTrainedModel, settings: TrainSettings, train: datasets.Dataset,
                 evaluation: datasets.Dataset) -> str:
    identity = {"base_model": model.name_or_path, "settings": dataclasses.asdict(settings),
                "data": content_fingerprint(train, evaluation)}
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:16]


def train_lora(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    train_dataset: datasets.Dataset,
    eval_dataset: datasets.Dataset,
    settings: TrainSettings,
    output_dir: Path,
    checkpoint_dir: Path,
    on_log: Callable[[str], None] | None = None,
    callbacks: Sequence[TrainerCallback] = (),
) -> AdapterArtifact:
    """Train a LoRA adapter on `model`, save it (adapter + tokenizer) atomically to `output_dir`, and give `model`
    back as it was. Checkpoints go under `checkpoint_dir/<fingerprint of model, settings and data>`, so a re-run
    after an interruption resumes only when nothing changed; they are deleted once the adapter is saved. `callbacks`
    join the trainer's (step metrics for a tracker)."""
    say = on_log or log.info
    columns = ["input_ids", "labels"]
    train_dataset, eval_dataset = train_dataset.select_columns(columns), eval_dataset.select_columns(columns)
    targets = target_modules_for(model, settings)
    run_dir = Path(checkpoint_dir) / _fingerprint(model, settings, train_dataset, eval_dataset)
    last_checkpoint = get_last_checkpoint(str(run_dir)) if run_dir.is_dir() else None
    args = _sft_config(settings, run_dir, model, say)
    with _lora_attached(model, settings, targets, say) as peft_model:
        progress = ProgressCallback(say)
        trainer = speedups.trainer_class(settings.speedups, settings.cuda_graph and not settings.compile_layers)(
            model=peft_model, args=args, train_dataset=train_dataset, eval_dataset=eval_dataset,
            processing_class=tokenizer, callbacks=[progress, *callbacks],
        )
        trainer.remove_callback(PrinterCallback)  # it prints every log dict; ProgressCallback says it in one line
        with speedups.for_training(model, peft_model, settings.speedups, settings.compile_layers,
                                   keeps_activations=not settings.gradient_checkpointing,
                                   kernel_dropout=settings.lora_dropout_kernel):
            run = _evaluate_train_evaluate(trainer, last_checkpoint, run_dir, say)
        with atomic_path(Path(output_dir)) as staging:
            peft_model.save_pretrained(str(staging), safe_serialization=True)
            tokenizer.save_pretrained(str(staging))
        say(f"adapter saved to {output_dir}")
    shutil.rmtree(run_dir, ignore_errors=True)  # checkpoints only serve an interrupted run
    return _artifact(model, settings, targets, trainer, progress, run, last_checkpoint, Path(output_dir))


@dataclasses.dataclass(frozen=True)
class _TrainingRun:
    base_eval_loss: float
    eval_loss: float
    mean_train_loss: float
    train_seconds: float
    base_evaluation_seconds: float  # training starts a new log history, without the base model's evaluation
    trainable_parameters: int
    total_parameters: int


def _parameter_counts(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, all) parameters."""
    parameters = list(model.parameters())
    return sum(p.numel() for p in parameters if p.requires_grad), sum(p.numel() for p in parameters)


@contextlib.contextmanager
def _lora_attached(model: PreTrainedModel, settings: TrainSettings, targets: tuple[str, ...],
                   say: Callable[[str], None]) -> Iterator[PeftModel]:
    """`model` with fresh LoRA layers on `targets`, their count checked; the base comes back as it was."""
    expected = expected_trainable_parameters(model, targets, settings.lora_r, settings.layers_to_transform)
    requires_grad = {name: p.requires_grad for name, p in model.named_parameters()}
    set_seed(settings.seed)  # LoRA A is initialised randomly
    lora = LoraConfig(
        r=settings.lora_r, lora_alpha=settings.lora_alpha, lora_dropout=settings.lora_dropout,
        target_modules=list(targets), bias="none", task_type="CAUSAL_LM",
        layers_to_transform=list(settings.layers_to_transform) or None,
    )
    peft_model = get_peft_model(model, lora)
    try:
        trainable, total = _parameter_counts(peft_model)
        if trainable != expected:
            raise ValueError(
                f"LoRA trains {trainable:,} parameters, expected {expected:,} for {targets} at r={settings.lora_r}")
        say(f"LoRA r={settings.lora_r} on {', '.join(targets)}: "
            f"{trainable:,} trainable of {total:,} ({trainable / total:.2%})")
        if model.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        yield peft_model
    finally:
        models.restore_base_model(peft_model, requires_grad)


def _evaluate_train_evaluate(trainer: SFTTrainer, last_checkpoint: str | None, run_dir: Path,
                             say: Callable[[str], None]) -> _TrainingRun:
    """The base model's eval loss (LoRA B starts at zero), training (resumed when a checkpoint exists), and the
    adapter's eval loss."""
    base_evaluation = trainer.evaluate()
    base_eval_loss = base_evaluation["eval_loss"]
    say(f"base model eval loss {base_eval_loss:.4f}")
    if last_checkpoint:
        say(f"resuming from {last_checkpoint}: same base model, settings and data as the interrupted run")
    else:
        say(f"no checkpoint for this configuration under {run_dir}: training from step 0")
    started = time.monotonic()
    outcome = trainer.train(resume_from_checkpoint=last_checkpoint)
    train_seconds = time.monotonic() - started
    return _TrainingRun(base_eval_loss, _final_eval_loss(trainer), outcome.training_loss, train_seconds,
                        base_evaluation["eval_runtime"], *_parameter_counts(trainer.model))


def _artifact(model: PreTrainedModel, settings: TrainSettings, targets: tuple[str, ...], trainer: SFTTrainer,
              progress: ProgressCallback, run: _TrainingRun, last_checkpoint: str | None,
              output_dir: Path) -> AdapterArtifact:
    state, device = trainer.state, model.device.type
    resumed_step = int(Path(last_checkpoint).name.split("-")[-1]) if last_checkpoint else 0
    train_points = [(entry["step"], entry["loss"]) for entry in state.log_history if "loss" in entry]
    evaluations = [entry for entry in state.log_history if "eval_runtime" in entry]
    eval_points = [(entry["step"], entry["eval_loss"]) for entry in evaluations if entry["step"] > 0]
    session_tokens = state.num_input_tokens_seen - (progress.start[2] if progress.start else 0)
    return AdapterArtifact(
        path=str(output_dir),
        base_model=model.name_or_path,
        target_modules=list(targets),
        lora_r=settings.lora_r,
        lora_alpha=settings.lora_alpha,
        trainable_parameters=run.trainable_parameters,
        total_parameters=run.total_parameters,
        steps=state.global_step,
        resumed_from_step=resumed_step,
        final_train_loss=train_points[-1][1] if train_points else run.mean_train_loss,
        mean_train_loss=run.mean_train_loss,
        eval_loss=run.eval_loss,
        base_eval_loss=run.base_eval_loss,
        tokens_seen=int(state.num_input_tokens_seen),
        tokens_per_second=session_tokens / max(run.train_seconds, 1e-9),
        train_seconds=run.train_seconds,
        seconds_per_step=run.train_seconds / max(state.global_step - resumed_step, 1),
        evaluation_seconds=run.base_evaluation_seconds + sum(entry["eval_runtime"] for entry in evaluations),
        evaluations=1 + len(evaluations),
        peak_memory_mb=_peak_memory_mb(device),
        peak_memory_kind="CUDA allocated" if device == "cuda" else "process peak RSS",
        adapter_bytes=sum((output_dir / name).stat().st_size for name in ADAPTER_FILES),
        device=device,
        optimizer=resolve_optimizer(settings.optimizer, device),
        train_loss_steps=[step for step, _ in train_points],
        train_losses=[loss for _, loss in train_points],
        eval_loss_steps=[step for step, _ in eval_points],
        eval_losses=[loss for _, loss in eval_points],
    )


def _final_eval_loss(trainer: SFTTrainer) -> float:
    """The eval loss after the last step: logged already when an evaluation fell on it, else evaluated now."""
    evaluations = [entry for entry in trainer.state.log_history if "eval_loss" in entry]
    if evaluations and evaluations[-1]["step"] == trainer.state.global_step > 0:
        return evaluations[-1]["eval_loss"]
    return trainer.evaluate()["eval_loss"]


def adapter_parameter_count(model: PreTrainedModel, adapter_path: str) -> int:
    """LoRA parameters of the adapter at `adapter_path` once loaded onto `model` with `PeftModel.from_pretrained`;
    `model` is given back without the adapter."""
    with models.adapted(model, adapter_path) as with_adapter:
        return sum(p.numel() for name, p in with_adapter.named_parameters() if "lora_" in name)


def _peak_memory_mb(device: str) -> float:
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
