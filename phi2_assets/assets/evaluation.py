"""The `evaluation` group: the evaluation rows, zero-shot and fine-tuned summaries, the template comparison
and the ROUGE report. Every summary asset reads `evaluation_xsum`, so all of them score the same rows.
"""

import dataclasses

import dagster as dg
import pandas as pd

from phi2_assets.automation import follows_new_adapter
from phi2_assets.config import EvaluationSetConfig, SummariesConfig, TemplateComparisonConfig, to_settings
from phi2_assets.metadata import png_markdown, table_markdown
from phi2_assets.ml import generate, reports, stats
from phi2_assets.ml.cleaning import word_counts
from phi2_assets.ml.scoring import ROUGE_TYPES, score_pairs, summarize_scores
from phi2_assets.ml.train import AdapterArtifact
from phi2_assets.profiles import PROFILE, data_dir
from phi2_assets.resources import BaseModelResource

OWNERS = ["team:ml-platform"]
GROUP = "evaluation"
PREVIEW_ROWS = 8
# Log a progress line about this often (in batches) while generating.
PROGRESS_LINES = 10


@dg.asset(
    ins={split: dg.AssetIn(key=dg.AssetKey(["cleaned_xsum", split])) for split in generate.EVALUATION_SPLITS},
    group_name=GROUP, kinds={"pandas", "parquet"}, owners=OWNERS, code_version="1",
)
def evaluation_xsum(config: EvaluationSetConfig, validation: pd.DataFrame, test: pd.DataFrame) -> dg.Output[pd.DataFrame]:
    """The rows every evaluation asset uses (split and cap from config): one selection, so zero-shot, fine-tuned
    and template comparisons provably score the same articles against the same references."""
    settings = to_settings(generate.EvaluationSetSettings, config)
    rows = settings.select({"validation": validation, "test": test}[settings.split])
    return dg.Output(rows, metadata={
        "split": settings.split, "rows": len(rows), **stats.xsum_eda(rows), "preview": table_markdown(stats.preview(rows)),
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
    errors = frame.loc[frame["status"] == "error", "error"]
    preview = pd.DataFrame({
        "article": frame["document"].str.slice(0, 100), "reference": frame["summary"], "generated": frame["generated"], "status": frame["status"],
    })
    return dg.Output(frame, metadata={
        "rows": len(frame),
        "success_rate": round(result.success_rate, 4),
        "empty": int((frame["status"] == "empty").sum()),
        "errors": len(errors),
        "first_error": errors.iloc[0] if len(errors) else "",
        "mean_words": round(float(word_counts(ok["generated"]).mean()), 1) if len(ok) else 0.0,
        "hit_token_limit_share": round(float(frame["hit_token_limit"].mean()), 3) if len(frame) else 0.0,
        "summaries_per_second": round(result.summaries_per_second, 3),
        "generation_seconds": round(result.seconds, 1),
        "batch_size": result.batch_size,
        "template": settings.template,
        "max_new_tokens": settings.max_new_tokens,
        "num_beams": settings.num_beams,
        "preview": table_markdown(stats.preview(preview, rows=PREVIEW_ROWS)),
    })


@dg.asset(group_name=GROUP, pool="gpu", kinds={"pytorch", "huggingface", "parquet"}, owners=OWNERS, code_version="1")
def baseline_summaries(
    context: dg.AssetExecutionContext, config: SummariesConfig, base_model: BaseModelResource, evaluation_xsum: pd.DataFrame,
) -> dg.Output[pd.DataFrame]:
    """Zero-shot summaries of the base model on the evaluation rows: the bar the adapter has to clear.
    One row per article with its status (ok / empty / error); nothing is dropped."""
    settings = to_settings(generate.GenerationSettings, config)
    if settings.merged_bf16:
        return _generate(context, generate.load_merged_bf16(base_model.spec, base_model.model_dir(), None), base_model.tokenizer(), evaluation_xsum, settings, "zero-shot")
    model, tokenizer = base_model.load()
    return _generate(context, model, tokenizer, evaluation_xsum, settings, "zero-shot")


@dg.asset(
    group_name=GROUP, pool="gpu", kinds={"pytorch", "peft", "parquet"}, owners=OWNERS, code_version="1",
    automation_condition=follows_new_adapter,
)
def finetuned_summaries(
    context: dg.AssetExecutionContext, config: SummariesConfig, base_model: BaseModelResource,
    evaluation_xsum: pd.DataFrame, lora_adapter: AdapterArtifact,
) -> dg.Output[pd.DataFrame]:
    """Summaries of the base model with the trained LoRA adapter, same rows and decoding as the zero-shot ones.
    The adapter is attached for this step and removed after, so the shared base model stays clean."""
    settings = to_settings(generate.GenerationSettings, config)
    context.log.info(f"adapter {lora_adapter.path}")
    if settings.merged_bf16:
        merged = generate.load_merged_bf16(base_model.spec, base_model.model_dir(), lora_adapter.path)
        return _generate(context, merged, base_model.tokenizer(), evaluation_xsum, settings, "fine-tuned")
    model, tokenizer = base_model.load()
    with generate.adapted(model, lora_adapter.path) as with_adapter:
        output = _generate(context, with_adapter, tokenizer, evaluation_xsum, settings, "fine-tuned")
    return dg.Output(output.value, metadata={**output.metadata, "adapter": dg.MetadataValue.path(lora_adapter.path)})


@dg.asset(group_name=GROUP, pool="gpu", kinds={"pytorch", "huggingface", "parquet"}, owners=OWNERS, code_version="1")
def prompt_template_report(
    context: dg.AssetExecutionContext, config: TemplateComparisonConfig, base_model: BaseModelResource, evaluation_xsum: pd.DataFrame,
) -> dg.Output[pd.DataFrame]:
    """Zero-shot ROUGE of each prompt template on the first evaluation rows, naming the best (by ROUGE-L).
    Decoding follows the profile's generation settings; only the template changes."""
    settings = to_settings(generate.TemplateComparisonSettings, config)
    rows = evaluation_xsum.head(settings.samples)
    model, tokenizer = base_model.load()
    table = []
    for template in settings.templates:
        result = generate.generate_summaries(model, tokenizer, rows["document"].tolist(), dataclasses.replace(PROFILE.generation, template=template))
        scores = summarize_scores(score_pairs([r.text for r in result.records], rows["summary"].tolist()))
        table.append({
            "template": template, **{name: round(scores[name].mean, 4) for name in ROUGE_TYPES},
            "success_rate": round(result.success_rate, 4),
            "mean_words": round(float(word_counts(pd.Series([r.text for r in result.records])).mean()), 1),
            "summaries_per_second": round(result.summaries_per_second, 3),
        })
        context.log.info(f"template {template}: ROUGE-L {scores['rougeL'].mean:.4f}")
    frame = pd.DataFrame(table).sort_values("rougeL", ascending=False).reset_index(drop=True)
    return dg.Output(frame, metadata={
        "best_template": frame["template"].iloc[0], "best_rougeL": float(frame["rougeL"].iloc[0]),
        "samples": len(rows), "comparison": table_markdown(frame),
    })


@dg.asset(
    group_name=GROUP, kinds={"pandas", "json"}, owners=OWNERS, code_version="1",
    automation_condition=follows_new_adapter,
)
def rouge_report(
    context: dg.AssetExecutionContext, base_model: BaseModelResource, baseline_summaries: pd.DataFrame,
    finetuned_summaries: pd.DataFrame, lora_adapter: AdapterArtifact,
) -> dg.Output[reports.RougeReport]:
    """ROUGE-1/2/L/Lsum F1 (stemmed), mean and 95% bootstrap interval, zero-shot vs fine-tuned, with per-sample
    scores and the seed's report files under `reports/<run id>/`."""
    comparison = reports.compare(baseline_summaries, finetuned_summaries)
    about = {"run_id": context.run_id, "profile": PROFILE.name, "base_model": base_model.name_or_path, "adapter": lora_adapter.path}
    record, pngs = reports.write_report(data_dir() / "reports" / context.run_id, comparison, dataclasses.asdict(lora_adapter), about)
    figures = {}
    for model in reports.MODELS:
        for name, summary in comparison.scores[model].items():
            figures[f"{model}_{name}"] = round(summary.mean, 4)
            figures[f"{model}_{name}_ci95"] = f"[{summary.low:.4f}, {summary.high:.4f}]"
    return dg.Output(record, metadata={
        **figures,
        **{f"relative_improvement_{name}": None if value is None else round(value, 4) for name, value in record.relative_improvement.items()},
        "baseline_success_rate": round(record.baseline_success_rate, 4),
        "finetuned_success_rate": round(record.finetuned_success_rate, 4),
        "samples": record.samples,
        "report_dir": dg.MetadataValue.path(record.path),
        **{name.removesuffix(".png"): png_markdown(png, name.removesuffix(".png")) for name, png in pngs.items()},
    })
