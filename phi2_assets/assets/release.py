"""The `release` group: the champion adapter, decided by ROUGE-L on the same rows, and the export of the run's
adapter with a Hugging Face model card (optionally merged, optionally uploaded)."""

import dataclasses
import json
from pathlib import Path

import dagster as dg
import pandas as pd

from phi2_assets.assets.data import OWNERS
from phi2_assets.code_versions import code_version
from phi2_assets.config import ExportConfig, to_settings
from phi2_assets.metadata import table_markdown
from phi2_assets.ml import champion, export, generate
from phi2_assets.ml.reports import RougeReport
from phi2_assets.ml.train import AdapterArtifact
from phi2_assets.profiles import PROFILE, data_dir
from phi2_assets.resources import BaseModelResource, ModelHub
from phi2_assets.tracking import MlflowTracking

RELEASE_GROUP = "release"
# Newest materializations searched for the ones that belong to an adapter (its settings, its decoding).
HISTORY_SEARCHED = 50


@dg.asset(
    group_name=RELEASE_GROUP, kinds={"mlflow", "json"}, owners=OWNERS,
    code_version=code_version("phi2_assets.ml.champion"),
)
def champion_adapter(
    context: dg.AssetExecutionContext, mlflow_tracking: MlflowTracking, rouge_report: RougeReport,
) -> dg.Output[champion.Champion]:
    """The best adapter so far for this profile and these evaluation rows: the report's adapter replaces the
    champion only with a higher fine-tuned ROUGE-L on the same rows. With tracking on, the registered model's
    `champion` alias follows this decision (and nothing else)."""
    decision = champion.decide(data_dir() / "champions" / f"{PROFILE.name}.json", Path(rouge_report.path))
    version = None
    if decision.challenger_won:
        version = mlflow_tracking.crown(context, decision.adapter_path, {
            "rougeL": round(decision.rougeL, 4), "rows_key": decision.rows_key, "report": decision.report_path,
        })
    margin = decision.margin
    if decision.challenger_won:
        context.log.info(f"champion: {decision.adapter_path} (ROUGE-L {decision.rougeL:.4f})")
    else:
        context.log.info(f"champion kept: {decision.adapter_path} "
                         f"({decision.rougeL:.4f} >= {decision.challenger_rougeL:.4f})")
    tracked = mlflow_tracking.record(context, metrics={
        "champion_rougeL": decision.rougeL, "challenger_won": float(decision.challenger_won), "champion_margin": margin,
    })
    return dg.Output(decision, metadata={
        "winner": "challenger" if decision.challenger_won else "champion",
        "margin_rougeL": None if margin is None else round(margin, 4),
        "champion_rougeL": round(decision.rougeL, 4),
        "challenger_rougeL": round(decision.challenger_rougeL, 4),
        "previous_rougeL": None if decision.previous_rougeL is None else round(decision.previous_rougeL, 4),
        "champion_adapter": dg.MetadataValue.path(decision.adapter_path),
        "challenger_adapter": dg.MetadataValue.path(decision.challenger_path),
        "rows_key": decision.rows_key,
        "samples": decision.samples,
        **({"champion_version": version} if version else {}),
        **tracked,
    })


def _adapter_metadata(context: dg.AssetExecutionContext, asset: str, label: str, adapter_path: str) -> dict:
    """Metadata of `asset`'s newest materialization whose `label` entry names `adapter_path`."""
    records = context.instance.fetch_materializations(dg.AssetKey(asset), limit=HISTORY_SEARCHED).records
    for record in records:
        metadata = record.asset_materialization.metadata
        if label in metadata and str(metadata[label].value) == adapter_path:
            return {key: entry.value for key, entry in metadata.items()}
    raise dg.Failure(description=f"no materialization of {asset} for the adapter {adapter_path}: materialize "
                     f"{asset} (and rouge_report) for it first", allow_retries=False)


def _card_facts(context, settings: export.ExportSettings, adapter: AdapterArtifact, results: dict,
                decoding: generate.GenerationSettings, directory: Path) -> export.CardFacts:
    trained = _adapter_metadata(context, "lora_adapter", "path", adapter.path)
    recipe = {**trained.get("settings", {}), "optimizer (as run)": adapter.optimizer, "steps": adapter.steps,
              "trainable parameters": f"{adapter.trainable_parameters:,} ({adapter.trainable_share:.2%})",
              "tokens seen": f"{adapter.tokens_seen:,}", "eval loss (base)": f"{adapter.eval_loss:.4f} "
              f"({adapter.base_eval_loss:.4f})", "device": adapter.device, "precision": trained.get("precision", "")}
    return export.CardFacts(
        title=f"{PROFILE.model.name_or_path.split('/')[-1]} XSum LoRA ({PROFILE.name} profile)",
        base_model=PROFILE.model.name_or_path, license=export.license_for(PROFILE.model.name_or_path, settings.license),
        split=results["split"], samples=results["samples"], rouge=results["rouge"], recipe=recipe,
        template=decoding.template,
        decoding={"max_new_tokens": decoding.max_new_tokens, "num_beams": decoding.num_beams, "greedy": True},
        location=settings.push_to_hub or str(directory),
    )


def _file_table(directory: Path, files: list[str]) -> pd.DataFrame:
    return pd.DataFrame({"file": files, "MB": [round((directory / f).stat().st_size / 2**20, 2) for f in files]})


@dg.asset(
    group_name=RELEASE_GROUP, kinds={"huggingface", "peft", "safetensors"}, owners=OWNERS,
    code_version=code_version("phi2_assets.ml.export"),
)
def exported_model(
    context: dg.AssetExecutionContext, config: ExportConfig, base_model: BaseModelResource,
    mlflow_tracking: MlflowTracking, model_hub: ModelHub, lora_adapter: AdapterArtifact, rouge_report: RougeReport,
) -> dg.Output[export.ExportRecord]:
    """The adapter under `exports/<run id>/` in one rename: its files, `generation_config.json` (the decoding that
    was evaluated), a Hugging Face model card (README.md) with the ROUGE results and the loss curve, and with
    `merge` the merged full model under `merged/`; with `push_to_hub`, uploaded with HF_TOKEN."""
    settings = to_settings(export.ExportSettings, config)
    token = model_hub.require_token(settings.push_to_hub) if settings.push_to_hub else None
    results = json.loads((Path(rouge_report.path) / "evaluation_results.json").read_text())
    if results["adapter"] != lora_adapter.path:
        raise dg.Failure(description=f"rouge_report evaluated {results['adapter']}, not the current adapter "
                         f"{lora_adapter.path}: materialize the evaluation for it first", allow_retries=False)
    rows = context.instance.get_latest_materialization_event(dg.AssetKey("evaluation_xsum")).asset_materialization
    results["split"] = rows.metadata["split"].value
    evaluated = _adapter_metadata(context, "finetuned_summaries", "adapter", lora_adapter.path)
    decoding = dataclasses.replace(PROFILE.generation, template=evaluated["template"],
                                   max_new_tokens=int(evaluated["max_new_tokens"]),
                                   num_beams=int(evaluated["num_beams"]))
    model, tokenizer = base_model.load()
    directory = data_dir() / "exports" / context.run_id
    facts = _card_facts(context, settings, lora_adapter, results, decoding, directory)
    merged = None
    if settings.merge:
        merged = (generate.load_merged_bf16(base_model.spec, base_model.model_dir(), lora_adapter.path,
                                            speedups=False), tokenizer)
    files = export.write_export(
        directory, Path(lora_adapter.path), export.model_card(facts, settings.merge),
        generate.decoding_config(decoding, tokenizer, model), export.loss_curve_png(lora_adapter), merged,
    )
    context.log.info(f"exported {len(files)} files to {directory}")
    commit = None
    if settings.push_to_hub:
        commit = export.push_export(directory, settings.push_to_hub, token, settings.private,
                                    f"Export of run {context.run_id}")
        context.log.info(f"uploaded to {settings.push_to_hub}: {commit}")
    record = export.ExportRecord(path=str(directory), files=files, merged=settings.merge, repo_id=settings.push_to_hub)
    tracked = mlflow_tracking.record(context, config, artifacts={"export": directory / "README.md"})
    return dg.Output(record, metadata={
        "path": dg.MetadataValue.path(str(directory)),
        "files": table_markdown(_file_table(directory, files)),
        "merged": settings.merge,
        **({"hub_commit": dg.MetadataValue.url(commit)} if commit else {}),
        "model_card": dg.MetadataValue.md((directory / "README.md").read_text().split("\n---\n", 1)[-1]),
        **tracked,
    })
