"""The export of a trained adapter: its files, the evaluated decoding settings, a Hugging Face model card with the
ROUGE results, optionally the merged full model, all written in one atomic rename; and the upload to the hub.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections.abc import Mapping
from pathlib import Path

from transformers import GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase

from phi2_assets.ml import plots
from phi2_assets.ml.atomic import atomic_path
from phi2_assets.ml.prompts import template_text
from phi2_assets.ml.reports import MODELS
from phi2_assets.ml.scoring import ROUGE_TYPES
from phi2_assets.ml.settings import documented
from phi2_assets.ml.train import AdapterArtifact

MERGED_DIR = "merged"
LOSS_CURVE = "loss_curve.png"
XSUM_DATASET = "EdinburghNLP/xsum"
# The license an adapter inherits from its base model; other bases are marked `other`.
BASE_MODEL_LICENSES = {"microsoft/phi-2": "mit", "google/gemma-3-270m": "gemma"}
ROUGE_NAMES = {"rouge1": "ROUGE-1", "rouge2": "ROUGE-2", "rougeL": "ROUGE-L", "rougeLsum": "ROUGE-Lsum"}
CARD_TAGS = ["peft", "lora", "summarization", "xsum", "trl", "dagster"]


@dataclasses.dataclass(frozen=True)
class ExportSettings:
    """What the export holds and where it goes."""

    merge: bool = documented("also write the merged full model (safetensors) under merged/", False)
    push_to_hub: str | None = documented("hub repo id to upload the export to with HF_TOKEN; null = local only", None)
    private: bool = documented("with push_to_hub: create the repo private", True)
    license: str | None = documented("license in the model card; null = the base model's (phi-2: mit, gemma: gemma)",
                                     None)

    def __post_init__(self) -> None:
        if self.push_to_hub is not None and self.push_to_hub.count("/") != 1:
            raise ValueError(f"push_to_hub must be a repo id like owner/name, got {self.push_to_hub!r}")


@dataclasses.dataclass(frozen=True)
class ExportRecord:
    """The `exported_model` value: where the export lies and what it holds."""

    path: str
    files: list[str]
    merged: bool
    repo_id: str | None


@dataclasses.dataclass(frozen=True)
class CardFacts:
    """Everything the model card states, gathered by the asset from the adapter, the report and the configs."""

    title: str
    base_model: str
    license: str
    split: str
    samples: int
    rouge: dict  # model -> rouge type -> {"mean", "low", "high"} (the report's evaluation_results.json)
    recipe: dict[str, object]
    template: str
    decoding: dict[str, object]
    location: str  # the repo id, or the export directory where nothing is uploaded


def loss_curve_png(artifact: AdapterArtifact, title: str = "lora_adapter: loss") -> bytes:
    return plots.curves_png(
        {
            "train loss": (artifact.train_loss_steps, artifact.train_losses),
            "eval loss (step 0 = base model)": (
                [0, *artifact.eval_loss_steps], [artifact.base_eval_loss, *artifact.eval_losses]
            ),
        },
        title=title, xlabel="optimizer step", ylabel="loss on summary tokens",
    )


def license_for(base_model: str, configured: str | None) -> str:
    return configured or BASE_MODEL_LICENSES.get(base_model, "other")


def _card_data(facts: CardFacts):
    from huggingface_hub import EvalResult, ModelCardData

    results = [
        EvalResult(
            task_type="summarization", task_name="Summarization", dataset_type=XSUM_DATASET,
            dataset_name=f"XSum ({facts.split}, {facts.samples} rows)", dataset_split=facts.split,
            metric_type="rouge", metric_name=ROUGE_NAMES[name],
            metric_value=round(facts.rouge["finetuned"][name]["mean"], 4),
        )
        for name in ROUGE_TYPES
    ]
    return ModelCardData(
        base_model=facts.base_model, library_name="peft", license=facts.license, datasets=[XSUM_DATASET],
        tags=CARD_TAGS, pipeline_tag="text-generation", model_name=facts.title, eval_results=results,
    )


def loading_snippet(location: str) -> str:
    """Three lines that load the adapter onto its base model, and its tokenizer."""
    quoted = json.dumps(location)
    return (
        "from peft import AutoPeftModelForCausalLM\n"
        "from transformers import AutoTokenizer\n"
        f"model, tokenizer = AutoPeftModelForCausalLM.from_pretrained({quoted}), "
        f"AutoTokenizer.from_pretrained({quoted})\n"
    )


def summarizing_snippet(location: str, template: str) -> str:
    """A summary with the training prompt and the evaluated decoding settings (one line, greedy)."""
    return (
        "from transformers import GenerationConfig\n"
        f"decoding = GenerationConfig.from_pretrained({json.dumps(location)})\n"
        f"inputs = tokenizer({json.dumps(template_text(template))}.format(article=article), return_tensors=\"pt\")\n"
        "output = model.generate(**inputs, generation_config=decoding)\n"
        "summary = tokenizer.decode(output[0, inputs.input_ids.shape[1]:], skip_special_tokens=True).strip()\n"
    )


def _rouge_rows(rouge: Mapping) -> list[str]:
    rows = ["| ROUGE F1 | zero-shot [95% CI] | fine-tuned [95% CI] |", "|---|---|---|"]
    for name in ROUGE_TYPES:
        cells = [f"{rouge[m][name]['mean']:.4f} [{rouge[m][name]['low']:.4f}, {rouge[m][name]['high']:.4f}]"
                 for m in MODELS]
        rows.append(f"| {ROUGE_NAMES[name]} | {' | '.join(cells)} |")
    return rows


def card_body(facts: CardFacts, merged: bool) -> str:
    recipe = ["| setting | value |", "|---|---|", *(f"| {key} | {value} |" for key, value in facts.recipe.items())]
    decoding = ", ".join(f"{key}={value}" for key, value in facts.decoding.items())
    base = facts.base_model
    if "/" in base:  # a hub id
        base = f"[{base}](https://huggingface.co/{base})"
    intro = (
        f"A LoRA adapter for {base} that writes one-sentence news summaries, fine-tuned on "
        f"[XSum](https://huggingface.co/datasets/{XSUM_DATASET}) with TRL's SFTTrainer (loss on the summary tokens "
        "only) by the phi2_assets Dagster pipeline."
    )
    method = (
        f"Both models decode the same articles with the `{facts.template}` prompt ({decoding}); the summary is the "
        "first generated line. F1 with stemming; intervals are 95% bootstrap intervals of the mean."
    )
    usage = "A summary of `article` with the training prompt and the evaluated decoding (it ends with the line):"
    lines = [
        f"# {facts.title}", "", intro, "", "## Recipe", "", *recipe, "",
        f"## Evaluation: {facts.samples} XSum {facts.split} articles", "", method, "", *_rouge_rows(facts.rouge), "",
        "## Training loss", "", f"![loss curve]({LOSS_CURVE})", "",
        "## Use", "", "```python", loading_snippet(facts.location).rstrip(), "```", "",
        usage, "", "```python", summarizing_snippet(facts.location, facts.template).rstrip(), "```",
    ]
    if merged:
        lines += ["", (f"`{MERGED_DIR}/` holds the adapter merged into the base weights (safetensors), loadable "
                       "with `AutoModelForCausalLM.from_pretrained` and without PEFT.")]
    return "\n".join(lines) + "\n"


def model_card(facts: CardFacts, merged: bool) -> str:
    """The card as README.md text: YAML front matter (base_model, library_name, datasets, tags, license,
    model-index with the ROUGE results) and the body."""
    return f"---\n{_card_data(facts).to_yaml()}\n---\n\n{card_body(facts, merged)}"


def write_export(
    directory: Path, adapter_dir: Path, card: str, decoding: GenerationConfig, loss_png: bytes,
    merged: tuple[PreTrainedModel, PreTrainedTokenizerBase] | None,
) -> list[str]:
    """The export under `directory` in one rename; returns its files, relative to it."""
    with atomic_path(Path(directory)) as staging:
        shutil.copytree(adapter_dir, staging)
        (staging / "README.md").write_text(card)  # replaces PEFT's template card
        decoding.save_pretrained(str(staging))
        (staging / LOSS_CURVE).write_bytes(loss_png)
        if merged is not None:
            model, tokenizer = merged
            model.save_pretrained(str(staging / MERGED_DIR), safe_serialization=True)
            tokenizer.save_pretrained(str(staging / MERGED_DIR))
            decoding.save_pretrained(str(staging / MERGED_DIR))
    return sorted(str(path.relative_to(directory)) for path in Path(directory).rglob("*") if path.is_file())


def push_export(directory: Path, repo_id: str, token: str, private: bool, message: str) -> str:
    """Upload the export folder to the hub repo (created when missing); returns the commit URL."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    return api.upload_folder(repo_id=repo_id, folder_path=str(directory), commit_message=message).commit_url
