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
from phi2_assets.code_versions import code_version
from phi2_assets.config import EvaluationSetConfig, SummariesConfig, TemplateComparisonConfig, to_settings
from phi2_assets.metadata import png_markdown, table_markdown, table_metadata
from phi2_assets.ml import generate, models, reports, stats
from phi2_assets.ml.cleaning import word_counts
from phi2_assets.ml.scoring import ROUGE_TYPES, score_pairs
from phi2_assets.ml.settings import settings_from_mapping
from phi2_assets.ml.train import AdapterArtifact
from phi2_assets.profiles import PROFILE, data_dir
from phi2_assets.resources import BaseModelResource
from phi2_assets.tracking import MlflowTracking

PREVIEW_ROWS = 8
# Log a progress line about this often (in batches) while generating.
PROGRESS_LINES = 10
SUMMARIES_VERSION = code_version("phi2_assets.ml.generate", "phi2_assets.ml.models")


@dg.asset(
    ins={split: dg.AssetIn(key=cleaned_key(split)) for split in generate.EVALUATION_SPLITS},
    group_name=EVALUATION_GROUP, kinds={"pandas", "parquet"}, owners=OWNERS,
    code_version=code_version("phi2_assets.ml.generate"),
)
def evaluation_xsum(
    context: dg.AssetExecutionContext,
    config: EvaluationSetConfig,
    mlflow_tracking: MlflowTracking,
    validation: pd.DataFrame,
    test: pd.DataFrame,
) -> dg.Output[pd.DataFrame]:
    """The rows every evaluation asset uses (split and cap from config): one selection, so zero-shot, fine-tuned
    and template comparisons provably score the same articles against the same references."""
    settings = to_settings(generate.EvaluationSetSettings, config)
    rows = settings.select({"validation": validation, "test": test}[settings.split])
    return dg.Output(
        rows,
        metadata={
            **table_metadata(rows),
            "split": settings.split,
            **stats.xsum_eda(rows),
            "preview": table_markdown(stats.preview(rows)),
            **mlflow_tracking.record(context, config, metrics={"evaluation_rows": len(rows)}),
        },
    )


def _progress(context: dg.AssetExecutionContext, label: str):
    """A progress callback that logs about every tenth of the way, not every batch."""
    logged = [0]

    def report(done: int, total: int) -> None:
        if done == total or done - logged[0] >= total / PROGRESS_LINES:
            logged[0] = done
            context.log.info(f"{label}: {done}/{total} summaries")

    return report


def _generate(
    context,
    model,
    tokenizer,
    rows: pd.DataFrame,
    settings: generate.GenerationSettings,
    label: str,
) -> dg.Output[pd.DataFrame]:
    result = generate.generate_summaries(
        model,
        tokenizer,
        rows["document"].tolist(),
        settings,
        on_progress=_progress(context, label),
    )
    records = pd.DataFrame([dataclasses.asdict(record) for record in result.records])
    frame = pd.concat(
        [rows[["id", "document", "summary"]].reset_index(drop=True), records.rename(columns={"text": "generated"})],
        axis=1,
    )
    ok = frame[frame["status"] == "ok"]
    preview = pd.DataFrame(
        {
            "article": frame["document"].str.slice(0, 100),
            "reference": frame["summary"],
            "generated": frame["generated"],
            "status": frame["status"],
        }
    )
    return dg.Output(
        frame,
        metadata={
            **table_metadata(frame),
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
            "decoding": dg.MetadataValue.json(dataclasses.asdict(settings)),
            "preview": table_markdown(stats.preview(preview, rows=PREVIEW_ROWS)),
        },
    )


def _tracked(context, mlflow_tracking: MlflowTracking, config: SummariesConfig, output: dg.Output) -> dg.Output:
    """The summaries output with its config, success rate and speed in the run's MLflow run."""
    figures = {name: output.metadata[name].value for name in ("success_rate", "summaries_per_second", "mean_words")}
    name = context.op_def.name
    link = mlflow_tracking.record(context, config, metrics={f"{name}.{key}": value for key, value in figures.items()})
    return dg.Output(output.value, metadata={**output.metadata, **link})


@contextlib.contextmanager
def _summary_model(
    base_model: BaseModelResource, settings: generate.GenerationSettings, adapter_path: str | None = None
):
    """The model summaries come from: the adapter merged into a dense copy of the base when `merged_bf16` asks for
    it (without an adapter that copy only differs from the shared base when the base is 4-bit), else the shared
    base, with the adapter attached for the step."""
    if settings.merged_bf16 and (adapter_path or base_model.precision().quantized_4bit):
        yield generate.load_merged_bf16(base_model.spec, base_model.model_dir(), adapter_path, settings.speedups)
        return
    model, _ = base_model.load()
    if adapter_path is None:
        yield model
        return
    with models.adapted(model, adapter_path) as with_adapter:
        yield with_adapter


@dg.asset(
    group_name=EVALUATION_GROUP,
    pool="gpu",
    kinds={"pytorch", "huggingface", "parquet"},
    owners=OWNERS,
    code_version=SUMMARIES_VERSION,
)
def baseline_summaries(
    context: dg.AssetExecutionContext,
    config: SummariesConfig,
    base_model: BaseModelResource,
    mlflow_tracking: MlflowTracking,
    evaluation_xsum: pd.DataFrame,
) -> dg.Output[pd.DataFrame]:
    """Zero-shot summaries of the base model on the evaluation rows: the bar the adapter has to clear.
    One row per article with its status (ok / empty / error); nothing is dropped."""
    settings = to_settings(generate.GenerationSettings, config)
    with _summary_model(base_model, settings) as model:
        output = _generate(context, model, base_model.tokenizer(), evaluation_xsum, settings, "zero-shot")
    return _tracked(context, mlflow_tracking, config, output)


@dg.asset(
    group_name=EVALUATION_GROUP,
    pool="gpu",
    kinds={"pytorch", "peft", "parquet"},
    owners=OWNERS,
    code_version=SUMMARIES_VERSION,
    automation_condition=follows_new_adapter,
)
def finetuned_summaries(
    context: dg.AssetExecutionContext,
    config: SummariesConfig,
    base_model: BaseModelResource,
    mlflow_tracking: MlflowTracking,
    evaluation_xsum: pd.DataFrame,
    lora_adapter: AdapterArtifact,
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


@dataclasses.dataclass(frozen=True)
class BaselineReuse:
    """Whether the comparison can score `baseline_summaries`' first rows instead of generating its template again."""

    template: str | None
    reason: str
    summaries_per_second: float = 0.0


def _baseline_reuse(
    context: dg.AssetExecutionContext,
    decoding: generate.GenerationSettings,
    templates: tuple[str, ...],
    rows: pd.DataFrame,
    baseline: pd.DataFrame,
) -> BaselineReuse:
    """Reusable when the baseline decoded one of the compared templates with these settings, on these rows first."""
    event = context.instance.get_latest_materialization_event(dg.AssetKey("baseline_summaries"))
    metadata = event.asset_materialization.metadata if event else {}
    if "decoding" not in metadata:
        return BaselineReuse(None, "baseline_summaries records no decoding settings")
    used = settings_from_mapping(generate.GenerationSettings, metadata["decoding"].value)
    differing = [
        field.name
        for field in dataclasses.fields(used)
        if field.name != "template" and getattr(used, field.name) != getattr(decoding, field.name)
    ]
    if used.template not in templates:
        return BaselineReuse(None, f"baseline_summaries used template {used.template!r}, which is not compared")
    if differing:
        return BaselineReuse(None, f"decoding differs from baseline_summaries ({', '.join(differing)})")
    if baseline["id"].head(len(rows)).tolist() != rows["id"].tolist():
        return BaselineReuse(None, "baseline_summaries does not start with these rows")
    speed = float(metadata["summaries_per_second"].value) if "summaries_per_second" in metadata else 0.0
    return BaselineReuse(used.template, f"{used.template!r} from baseline_summaries' first {len(rows)} rows", speed)


def _template_row(
    template: str, texts: list[str], statuses: list[str], references: list[str], per_second: float, source: str
) -> dict:
    means = score_pairs(texts, references).mean()  # a ranking needs the means, not intervals
    return {
        "template": template,
        **{name: round(float(means[name]), 4) for name in ROUGE_TYPES},
        "success_rate": round(sum(status == "ok" for status in statuses) / len(statuses), 4) if statuses else 0.0,
        "mean_words": round(float(word_counts(pd.Series(texts)).mean()), 1),
        "summaries_per_second": round(per_second, 3),
        "source": source,
    }


@dg.asset(
    group_name=EVALUATION_GROUP,
    pool="gpu",
    kinds={"pytorch", "huggingface", "parquet"},
    owners=OWNERS,
    code_version=code_version("phi2_assets.ml.generate", "phi2_assets.ml.models", "phi2_assets.ml.scoring"),
)
def prompt_template_report(
    context: dg.AssetExecutionContext,
    config: TemplateComparisonConfig,
    base_model: BaseModelResource,
    mlflow_tracking: MlflowTracking,
    evaluation_xsum: pd.DataFrame,
    baseline_summaries: pd.DataFrame,
) -> dg.Output[pd.DataFrame]:
    """Zero-shot ROUGE of each prompt template on the first evaluation rows, naming the best (by ROUGE-L).
    Decoding follows this asset's config; only the template changes. The template `baseline_summaries` decoded
    is not generated again when its decoding and rows match: its first rows are scored instead."""
    comparison = to_settings(generate.TemplateComparisonSettings, config)
    decoding = to_settings(generate.GenerationSettings, config)
    rows = evaluation_xsum.head(comparison.samples)
    references = rows["summary"].tolist()
    reuse = _baseline_reuse(context, decoding, comparison.templates, rows, baseline_summaries)
    context.log.info(f"reuse of baseline_summaries: {reuse.reason}")
    table = []
    with contextlib.ExitStack() as models_in_use:
        model = None
        for template in comparison.templates:
            if template == reuse.template:
                reused = baseline_summaries.head(len(rows))
                texts, statuses = reused["generated"].fillna("").tolist(), reused["status"].tolist()
                table.append(
                    _template_row(
                        template, texts, statuses, references, reuse.summaries_per_second, "baseline_summaries"
                    )
                )
                continue
            if model is None:
                model = models_in_use.enter_context(_summary_model(base_model, decoding))
            settings = dataclasses.replace(decoding, template=template)
            result = generate.generate_summaries(model, base_model.tokenizer(), rows["document"].tolist(), settings)
            texts, statuses = [r.text for r in result.records], [r.status for r in result.records]
            table.append(_template_row(template, texts, statuses, references, result.summaries_per_second, "generated"))
            context.log.info(f"template {template}: ROUGE-L {table[-1]['rougeL']:.4f}")
    frame = pd.DataFrame(table).sort_values("rougeL", ascending=False).reset_index(drop=True)
    return dg.Output(
        frame,
        metadata={
            **table_metadata(frame),
            "best_template": frame["template"].iloc[0],
            "best_rougeL": float(frame["rougeL"].iloc[0]),
            "samples": len(rows),
            "comparison": table_markdown(frame),
            "reused_template": reuse.template or "",
            "reuse": reuse.reason,
            "max_new_tokens": decoding.max_new_tokens,
            "decoding": dg.MetadataValue.json(
                {k: v for k, v in dataclasses.asdict(decoding).items() if k != "template"}
            ),
            **mlflow_tracking.record(
                context, config, metrics={f"template.{row['template']}.rougeL": row["rougeL"] for row in table}
            ),
        },
    )


def _rouge_table(comparison: reports.Comparison) -> dg.MetadataValue:
    """Model x ROUGE type, each cell `mean [low, high]` (95% bootstrap interval)."""
    header = ["model", *ROUGE_TYPES]
    rows = [
        [
            label,
            *(f"{s.mean:.4f} [{s.low:.4f}, {s.high:.4f}]" for s in (comparison.scores[model][n] for n in ROUGE_TYPES)),
        ]
        for model, label in reports.MODELS.items()
    ]
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
        *("| " + " | ".join(row) + " |" for row in rows),
    ]
    return dg.MetadataValue.md("\n".join(lines))


def _rouge_figures(comparison: reports.Comparison) -> dict[str, float]:
    """`<model>_<type>` means and their interval bounds as numbers, so each plots in the asset's Plots tab."""
    figures = {}
    for model in reports.MODELS:
        for name, summary in comparison.scores[model].items():
            figures[f"{model}_{name}"] = round(summary.mean, 4)
            figures[f"{model}_{name}_ci95_low"] = round(summary.low, 4)
            figures[f"{model}_{name}_ci95_high"] = round(summary.high, 4)
    return figures


@dg.asset(
    group_name=EVALUATION_GROUP,
    kinds={"pandas", "json"},
    owners=OWNERS,
    code_version=code_version("phi2_assets.ml.reports"),
    automation_condition=follows_new_adapter,
)
def rouge_report(
    context: dg.AssetExecutionContext,
    base_model: BaseModelResource,
    mlflow_tracking: MlflowTracking,
    baseline_summaries: pd.DataFrame,
    finetuned_summaries: pd.DataFrame,
    lora_adapter: AdapterArtifact,
) -> dg.Output[reports.RougeReport]:
    """ROUGE-1/2/L/Lsum F1 (stemmed), mean and 95% bootstrap interval, zero-shot vs fine-tuned, with per-sample
    scores and the seed's report files under `reports/<run id>/`."""
    comparison = reports.compare(baseline_summaries, finetuned_summaries)
    about = {
        "run_id": context.run_id,
        "profile": PROFILE.name,
        "base_model": base_model.name_or_path,
        "adapter": lora_adapter.path,
    }
    record, pngs = reports.write_report(
        data_dir() / "reports" / context.run_id, comparison, dataclasses.asdict(lora_adapter), about
    )
    improvement = {
        f"relative_improvement_{name}": None if value is None else round(value, 4)
        for name, value in record.relative_improvement.items()
    }
    tracked = {
        **_rouge_figures(comparison),
        **{f"relative_improvement_{name}": value for name, value in record.relative_improvement.items()},
        "baseline_success_rate": record.baseline_success_rate,
        "finetuned_success_rate": record.finetuned_success_rate,
    }
    return dg.Output(
        record,
        metadata={
            "rouge_f1": _rouge_table(comparison),
            **_rouge_figures(comparison),
            **improvement,
            "baseline_success_rate": round(record.baseline_success_rate, 4),
            "finetuned_success_rate": round(record.finetuned_success_rate, 4),
            "samples": record.samples,
            "report_dir": dg.MetadataValue.path(record.path),
            **{name.removesuffix(".png"): png_markdown(png, name.removesuffix(".png")) for name, png in pngs.items()},
            **mlflow_tracking.record(context, metrics=tracked, artifacts={"report": Path(record.path)}),
        },
    )
