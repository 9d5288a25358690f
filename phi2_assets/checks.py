"""Every asset check, side by side. Blocking checks stop downstream steps that would compute garbage."""

import math

import dagster as dg
import datasets
import pandas as pd

from phi2_assets.assets.data import TRAINING_SPLITS, cleaned_key, raw_key
from phi2_assets.ml import generate
from phi2_assets.ml.reports import RougeReport
from phi2_assets.ml.sources import COLUMNS, SPLITS
from phi2_assets.ml.tokenization import IGNORE_INDEX, token_ids
from phi2_assets.ml.train import AdapterArtifact, adapter_parameter_count
from phi2_assets.resources import BaseModelResource


def _result(key: dg.AssetKey, name: str, problems: list[str], **metadata) -> dg.AssetCheckResult:
    return dg.AssetCheckResult(
        asset_key=key, check_name=name, passed=not problems,
        description="; ".join(problems) if problems else "ok", metadata=metadata,
    )


def _raw_check(split: str) -> dg.AssetChecksDefinition:
    @dg.asset_check(asset=raw_key(split), name="has_columns_and_rows", blocking=True)
    def check(frame: pd.DataFrame) -> dg.AssetCheckResult:
        problems = [f"missing column {c!r}" for c in COLUMNS if c not in frame.columns]
        if len(frame) == 0:
            problems.append("no rows")
        return _result(raw_key(split), "has_columns_and_rows", problems, rows=len(frame))

    return check


@dg.asset_check(
    asset="tokenized_xsum",
    blocking=True,
    additional_ins={f"cleaned_{split}": dg.AssetIn(key=cleaned_key(split)) for split in TRAINING_SPLITS},
)
def tokenized_sequences_fit(
    context: dg.AssetCheckExecutionContext, base_model: BaseModelResource, tokenized_xsum: datasets.DatasetDict,
    cleaned_train: pd.DataFrame, cleaned_validation: pd.DataFrame,
) -> dg.AssetCheckResult:
    """No sequence over max_length, every sequence supervised, and every summary intact: the supervised tokens
    are exactly the re-tokenized reference summary followed by EOS."""
    event = context.instance.get_latest_materialization_event(dg.AssetKey("tokenized_xsum"))
    max_length = int(event.asset_materialization.metadata["max_length"].value)
    tokenizer = base_model.tokenizer()
    summaries = pd.concat([cleaned_train, cleaned_validation]).set_index("id")["summary"]
    problems, checked = [], 0
    for split, rows in tokenized_xsum.items():
        # the summaries encoded the way tokenization encoded them: one batch through the tokenizer's backend
        references = token_ids(tokenizer, summaries.loc[rows["id"]].tolist())
        columns = zip(rows["id"], rows["input_ids"], rows["labels"], references, strict=True)
        for row_id, input_ids, labels, reference in columns:
            supervised = [token for token in labels if token != IGNORE_INDEX]
            expected = [*reference, tokenizer.eos_token_id]
            if len(input_ids) > max_length:
                problems.append(f"{split}/{row_id}: {len(input_ids)} tokens > max_length {max_length}")
            elif not supervised:
                problems.append(f"{split}/{row_id}: no supervised tokens")
            elif supervised != expected:
                problems.append(f"{split}/{row_id}: summary truncated or altered")
            checked += 1
    return dg.AssetCheckResult(
        passed=not problems, description="; ".join(problems[:5]) if problems else "ok",
        metadata={"sequences_checked": checked, "failures": len(problems), "max_length": max_length},
    )


data_checks = [*(_raw_check(split) for split in SPLITS), tokenized_sequences_fit]


@dg.asset_check(asset="lora_adapter", name="losses_finite", blocking=True)
def adapter_losses_finite(lora_adapter: AdapterArtifact) -> dg.AssetCheckResult:
    """Every logged train loss and both eval losses are finite numbers."""
    losses = [*lora_adapter.train_losses, *lora_adapter.eval_losses, lora_adapter.eval_loss,
              lora_adapter.base_eval_loss]
    bad = [loss for loss in losses if not math.isfinite(loss)]
    return _result(dg.AssetKey("lora_adapter"), "losses_finite", [f"{len(bad)} non-finite losses"] if bad else [],
                   losses_checked=len(losses))


@dg.asset_check(asset="lora_adapter", name="eval_loss_below_base", blocking=True)
def adapter_beats_base_model(lora_adapter: AdapterArtifact) -> dg.AssetCheckResult:
    """The adapter lowers the validation loss of the base model; otherwise evaluating it is wasted time."""
    problems = []
    if not lora_adapter.eval_loss < lora_adapter.base_eval_loss:
        problems.append(f"eval loss {lora_adapter.eval_loss:.4f} is not below the base model's"
                        f" {lora_adapter.base_eval_loss:.4f}")
    return _result(
        dg.AssetKey("lora_adapter"), "eval_loss_below_base", problems,
        eval_loss=lora_adapter.eval_loss, base_eval_loss=lora_adapter.base_eval_loss,
    )


@dg.asset_check(asset="lora_adapter", name="loads_back", blocking=True)
def adapter_loads_back(base_model: BaseModelResource, lora_adapter: AdapterArtifact) -> dg.AssetCheckResult:
    """The saved adapter loads onto the base model with `PeftModel.from_pretrained` and holds the trained count."""
    model, _ = base_model.load()
    loaded = adapter_parameter_count(model, lora_adapter.path)
    problems = [] if loaded == lora_adapter.trainable_parameters else [
        f"{lora_adapter.path} holds {loaded:,} LoRA parameters, training reported {lora_adapter.trainable_parameters:,}"
    ]
    return _result(dg.AssetKey("lora_adapter"), "loads_back", problems, loaded_parameters=loaded,
                   path=dg.MetadataValue.path(lora_adapter.path))


training_checks = [adapter_losses_finite, adapter_beats_base_model, adapter_loads_back]


MIN_SUCCESS_RATE = 0.99


def generation_success(key: dg.AssetKey, frame: pd.DataFrame, minimum: float = MIN_SUCCESS_RATE) -> dg.AssetCheckResult:
    """Share of rows with status `ok` (a non-empty first line) against `minimum`; the seed's run had 10%."""
    rate = float((frame["status"] == "ok").mean()) if len(frame) else 0.0
    counts = frame["status"].value_counts().to_dict()
    problems = [] if rate >= minimum else [f"success rate {rate:.1%} < {minimum:.0%} ({counts})"]
    return dg.AssetCheckResult(
        asset_key=key, check_name="generation_success_rate", passed=not problems, severity=dg.AssetCheckSeverity.ERROR,
        description="; ".join(problems) if problems else "ok", metadata=generate.status_figures(frame),
    )


def _success_rate_check(asset: str) -> dg.AssetChecksDefinition:
    @dg.asset_check(asset=asset, name="generation_success_rate", blocking=True)
    def check(frame: pd.DataFrame) -> dg.AssetCheckResult:
        """At least 99% of the rows hold a non-empty summary: a report over failed generations is meaningless."""
        return generation_success(dg.AssetKey(asset), frame)

    return check


@dg.asset_check(asset="rouge_report", name="finetuned_rougeL_not_below_baseline")
def finetuned_rougeL_not_below_baseline(rouge_report: RougeReport) -> dg.AssetCheckResult:
    """The adapter should not make summaries worse than the zero-shot model (a warning: small runs are noisy)."""
    baseline, finetuned = rouge_report.baseline["rougeL"], rouge_report.finetuned["rougeL"]
    return dg.AssetCheckResult(
        passed=finetuned >= baseline, severity=dg.AssetCheckSeverity.WARN,
        description="ok" if finetuned >= baseline else f"fine-tuned ROUGE-L {finetuned:.4f} < zero-shot {baseline:.4f}",
        metadata={"baseline_rougeL": round(baseline, 4), "finetuned_rougeL": round(finetuned, 4)},
    )


evaluation_checks = [_success_rate_check("baseline_summaries"), _success_rate_check("finetuned_summaries"),
                     finetuned_rougeL_not_below_baseline]
