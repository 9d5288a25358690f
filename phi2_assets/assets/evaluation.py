"""The `evaluation` group: the evaluation rows, zero-shot and fine-tuned summaries, the template comparison
and the ROUGE report. Every summary asset reads `evaluation_xsum`, so all of them score the same rows.
"""

import contextlib
import dataclasses
from pathlib import Path

import dagster as dg
import pandas as pd

from phi2_assets.assets.data import OWNERS, cleaned_key
from phi2_assets.automation import EVALUATION_GROUP, follows_new_adapter
from phi2_assets.config import EvaluationSetConfig, SummariesConfig, TemplateComparisonConfig, to_settings
from phi2_assets.metadata import png_markdown, table_markdown
from phi2_assets.ml import generate, models, reports, stats
from phi2_assets.ml.cleaning import word_counts
from phi2_assets.ml.scoring import ROUGE_TYPES, score_pairs
from phi2_assets.ml.train import AdapterArtifact
from phi2_assets.profiles import PROFILE, data_dir
from phi2_assets.resources import BaseModelResource
from phi2_assets.tracking import MlflowTracking

PREVIEW_ROWS = 8
# Log a progress line about this often (in batches) while generating.
PROGRESS_LINES = 10


@dg.asset(
    ins={split: dg.AssetIn(key=cleaned_key(split)) for split in generate.EVALUATION_SPLITS},
    group_name=EVALUATION_GROUP, kinds={"pandas", "parquet"}, owners=OWNERS, code_version="1",
)
def evaluation_xsum(
    context: dg.AssetExecutionContext, config: EvaluationSetConfig, mlflow_tracking: MlflowTracking,
    validation: pd.DataFrame, test: pd.DataFrame,
) -> dg.Output[pd.DataFrame]:
    """The rows every evaluation asset uses (split and cap from config): one selection, so zero-shot, fine-tuned
    and template comparisons provably score the same articles against the same references."""
    settings = to_settings(generate.EvaluationSetSettings, config)
    rows = settings.select({"validation": validation, "test": test}[settings.split])
    return dg.Output(rows, metadata={
        "split": settings.split, **stats.xsum_eda(rows), "preview": table_markdown(stats.preview(rows)),
        **mlflow_tracking.record(context, config, metrics={"evaluation_rows": len(rows)}),
    })


def _progress(context: dg.AssetExecutionContext, label: str):
    """A progress callback that logs about every tenth of the way, not every batch."""
    logged = [0]

    def report(done: int, total: int) -> None:
        if done == total or done - logged[0] >= total / PROGRESS_LINES:
            logged[0] = done
            context.log.info(f"{label}: {done}/{total} summaries")

    return report


def _generate(context, model, tokenizer, rows: pd.DataFrame, settings: generate.GenerationSettings, label: str) -> dg.Output[pd.DataFrame]:
    result = generate.generate_summaries(model, tokenizer, rows["document"].tolist(), settings, on_progress=_progress(context, label))
    records = pd.DataFrame([dataclasses.asdict(record) for record in result.records])
    frame = pd.concat([rows[["id", "document", "summary"]].reset_index(drop=True), records.rename(columns={"text": "generated"})], axis=1)
    ok = frame[frame["status"] == "ok"]
    preview = pd.DataFrame({
        "article": frame["document"].str.slice(0, 100), "reference": frame["summary"], "generated": frame["generated"], "status": frame["status"],
    })
    return dg.Output(frame, metadata={
        **generate.status_figures(frame),
        "mean_words": round(float(word_counts(ok["generated"]).mean()), 1) if len(ok) else 0.0,
        "hit_token_limit_share": round(float(frame["hit_token_limit"].mean()), 3) if len(frame) else 0.0,
        "summaries_per_second": round(result.summaries_per_second, 3),
        "generation_seconds": round(result.seconds, 1),
        "batch_size": result.batch_size,
        "batches": len(result.batch_sizes),
        "template": settings.template,
        "max_new_tokens": settings.max_new_tokens,
        "num_beams": settings.num_beams,
        "preview": table_markdown(stats.preview(preview, rows=PREVIEW_ROWS)),
    })


def _tracked(context, mlflow_tracking: MlflowTracking, config: SummariesConfig, output: dg.Output) -> dg.Output:
    """The summaries output with its config, success rate and speed in the run's MLflow run."""
    figures = {name: output.metadata[name].value for name in ("success_rate", "summaries_per_second", "mean_words")}
    name = context.op_def.name
    link = mlflow_tracking.record(context, config, metrics={f"{name}.{key}": value for key, value in figures.items()})
    return dg.Output(output.value, metadata={**output.metadata, **link})


@contextlib.contextmanager
def _summary_model(base_model: BaseModelResource, settings: generate.GenerationSettings, adapter_path: str | None = None):
    """The model summaries come from: the adapter merged into a dense copy of the base when `merged_bf16` asks for
    it (without an adapter that copy only differs from the shared base when the base is 4-bit), else the shared
    base, with the adapter attached for the step."""
    if settings.merged_bf16 and (adapter_path or base_model.precision().quantized_4bit):
        yield generate.load_merged_bf16(base_model.spec, base_model.model_dir(), adapter_path)
        return
    model, _ = base_model.load()
    if adapter_path is None:
        yield model
        return
    with models.adapted(model, adapter_path) as with_adapter:
        yield with_adapter


@dg.asset(group_name=EVALUATION_GROUP, pool="gpu", kinds={"pytorch", "huggingface", "parquet"}, owners=OWNERS, code_version="1")
def baseline_summaries(
    context: dg.AssetExecutionContext, config: SummariesConfig, base_model: BaseModelResource,
    mlflow_tracking: MlflowTracking, evaluation_xsum: pd.DataFrame,
) -> dg.Output[pd.DataFrame]:
    """Zero-shot summaries of the base model on the evaluation rows: the bar the adapter has to clear.
    One row per article with its status (ok / empty / error); nothing is dropped."""
    settings = to_settings(generate.GenerationSettings, config)
    with _summary_model(base_model, settings) as model:
        output = _generate(context, model, base_model.tokenizer(), evaluation_xsum, settings, "zero-shot")
    return _tracked(context, mlflow_tracking, config, output)


@dg.asset(
    group_name=EVALUATION_GROUP, pool="gpu", kinds={"pytorch", "peft", "parquet"}, owners=OWNERS, code_version="1",
    automation_condition=follows_new_adapter,
)
def finetuned_summaries(
    context: dg.AssetExecutionContext, config: SummariesConfig, base_model: BaseModelResource,
    mlflow_tracking: MlflowTracking, evaluation_xsum: pd.DataFrame, lora_adapter: AdapterArtifact,
) -> dg.Output[pd.DataFrame]:
    """Summaries of the base model with the trained LoRA adapter, same rows and decoding as the zero-shot ones.
    The adapter is attached for this step and removed after (or merged into a separate copy), so the shared base
    model stays clean."""
    settings = to_settings(generate.GenerationSettings, config)
    context.log.info(f"adapter {lora_adapter.path}")
    with _summary_model(base_model, settings, lora_adapter.path) as model:
        output = _generate(context, model, base_model.tokenizer(), evaluation_xsum, settings, "fine-tuned")
    output = dg.Output(output.value, metadata={**output.metadata, "adapter": dg.MetadataValue.path(lora_adapter.path)})
    return _tracked(context, mlflow_tracking, config, output)


@dg.asset(group_name=EVALUATION_GROUP, pool="gpu", kinds={"pytorch", "huggingface", "parquet"}, owners=OWNERS, code_version="1")
def prompt_template_report(
    context: dg.AssetExecutionContext, config: TemplateComparisonConfig, base_model: BaseModelResource,
    mlflow_tracking: MlflowTracking, evaluation_xsum: pd.DataFrame,
) -> dg.Output[pd.DataFrame]:
    """Zero-shot ROUGE of each prompt template on the first evaluation rows, naming the best (by ROUGE-L).
    Decoding follows the profile's generation settings; only the template changes."""
    settings = to_settings(generate.TemplateComparisonSettings, config)
    rows = evaluation_xsum.head(settings.samples)
    model, tokenizer = base_model.load()
    table = []
    for template in settings.templates:
        result = generate.generate_summaries(model, tokenizer, rows["document"].tolist(), dataclasses.replace(PROFILE.generation, template=template))
        texts = [record.text for record in result.records]
        means = score_pairs(texts, rows["summary"].tolist()).mean()  # a ranking needs the means, not intervals
        table.append({
            "template": template, **{name: round(float(means[name]), 4) for name in ROUGE_TYPES},
            "success_rate": round(result.success_rate, 4),
            "mean_words": round(float(word_counts(pd.Series(texts)).mean()), 1),
            "summaries_per_second": round(result.summaries_per_second, 3),
        })
        context.log.info(f"template {template}: ROUGE-L {means['rougeL']:.4f}")
    frame = pd.DataFrame(table).sort_values("rougeL", ascending=False).reset_index(drop=True)
    return dg.Output(frame, metadata={
        "best_template": frame["template"].iloc[0], "best_rougeL": float(frame["rougeL"].iloc[0]),
        "samples": len(rows), "comparison": table_markdown(frame),
        **mlflow_tracking.record(context, config, metrics={
            f"template.{row['template']}.rougeL": row["rougeL"] for row in table
        }),
    })


@dg.asset(
    group_name=EVALUATION_GROUP, kinds={"pandas", "json"}, owners=OWNERS, code_version="1",
    automation_condition=follows_new_adapter,
)
def rouge_report(
    context: dg.AssetExecutionContext, base_model: BaseModelResource, mlflow_tracking: MlflowTracking,
    baseline_summaries: pd.DataFrame, finetuned_summaries: pd.DataFrame, lora_adapter: AdapterArtifact,
) -> dg.Output[reports.RougeReport]:
    """ROUGE-1/2/L/Lsum F1 (stemmed), mean and 95% bootstrap interval, zero-shot vs fine-tuned, with per-sample
    scores and the seed's report files under `reports/<run id>/`."""
    comparison = reports.compare(baseline_summaries, finetuned_summaries)
    about = {"run_id": context.run_id, "profile": PROFILE.name, "base_model": base_model.name_or_path, "adapter": lora_adapter.path}
    record, pngs = reports.write_report(data_dir() / "reports" / context.run_id, comparison, dataclasses.asdict(lora_adapter), about)
    figures, tracked = {}, {}
    for model in reports.MODELS:
        for name, summary in comparison.scores[model].items():
            figures[f"{model}_{name}"] = round(summary.mean, 4)
            figures[f"{model}_{name}_ci95"] = f"[{summary.low:.4f}, {summary.high:.4f}]"
            tracked.update({f"{model}_{name}": summary.mean, f"{model}_{name}_ci95_low": summary.low,
                            f"{model}_{name}_ci95_high": summary.high})
    tracked.update({f"relative_improvement_{name}": value for name, value in record.relative_improvement.items()})
    tracked.update(baseline_success_rate=record.baseline_success_rate, finetuned_success_rate=record.finetuned_success_rate)
    return dg.Output(record, metadata={
        **figures,
        **{f"relative_improvement_{name}": None if value is None else round(value, 4) for name, value in record.relative_improvement.items()},
        "baseline_success_rate": round(record.baseline_success_rate, 4),
        "finetuned_success_rate": round(record.finetuned_success_rate, 4),
        "samples": record.samples,
        "report_dir": dg.MetadataValue.path(record.path),
        **{name.removesuffix(".png"): png_markdown(png, name.removesuffix(".png")) for name, png in pngs.items()},
        **mlflow_tracking.record(context, metrics=tracked, artifacts={"report": Path(record.path)}),
    })
