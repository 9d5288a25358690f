"""The evaluation graph materialized for real on the tiny profile: same rows, the full report, the checks,
and the automation that keeps the report in step with the adapter."""

import json
from pathlib import Path

import dagster as dg
import pandas as pd
import pytest

from phi2_assets.checks import generation_success
from phi2_assets.ml.prompts import TEMPLATES
from phi2_assets.ml.reports import PLOT_FILES, REPORT_FILES
from phi2_assets.ml.scoring import ROUGE_TYPES, score_pairs
from phi2_assets.profiles import data_dir
from phi2_assets_tests.conftest import check_results, materializations

EVALUATION_ASSETS = (
    "evaluation_xsum",
    "baseline_summaries",
    "finetuned_summaries",
    "prompt_template_report",
    "rouge_report",
)


def stored(name: str) -> pd.DataFrame:
    return pd.read_parquet(data_dir() / "assets" / f"{name}.parquet")


@pytest.fixture(scope="module")
def whole_graph(materialize):
    result = materialize("*")
    assert result.success
    return result


def test_whole_graph_materializes_with_evaluation_metadata(whole_graph):
    metadata = materializations(whole_graph)
    assert set(EVALUATION_ASSETS) <= set(metadata)
    for name in ("baseline_summaries", "finetuned_summaries"):
        figures = metadata[name]
        assert figures["rows"] == figures["dagster/row_count"] == 8 and figures["batch_size"] == 4
        assert figures["summaries_per_second"] > 0 and figures["decoding"]["max_new_tokens"] == 16
        assert 0 <= figures["success_rate"] <= 1 and figures["preview"].startswith("| article")
        assert {"id", "generated", "status"} <= {column.name for column in figures["dagster/column_schema"].columns}
    for name in ("evaluation_xsum", "prompt_template_report"):
        assert metadata[name]["dagster/row_count"] == len(stored(name))
    report = metadata["rouge_report"]
    assert next(iter(report)) == "rouge_f1", "the report leads with its table"
    assert report["rouge_f1"].splitlines()[0] == "| model | " + " | ".join(ROUGE_TYPES) + " |"
    for model in ("baseline", "finetuned"):
        for name in ROUGE_TYPES:
            low, mean, high = (report[f"{model}_{name}{part}"] for part in ("_ci95_low", "", "_ci95_high"))
            assert all(isinstance(value, float) for value in (low, mean, high)) and 0 <= low <= mean <= high <= 1
            assert f"{mean:.4f} [{low:.4f}, {high:.4f}]" in report["rouge_f1"]
    for plot in PLOT_FILES:
        assert report[plot.removesuffix(".png")].startswith("![")
    checks = check_results(whole_graph)
    assert checks[("baseline_summaries", "generation_success_rate")]
    assert checks[("finetuned_summaries", "generation_success_rate")]
    assert ("rouge_report", "finetuned_rougeL_not_below_baseline") in checks  # a warning either way on a random model


def test_every_summary_asset_uses_the_same_rows(whole_graph):
    rows = stored("evaluation_xsum")
    assert len(rows) == 8
    for name in ("baseline_summaries", "finetuned_summaries"):
        frame = stored(name)
        assert frame["id"].tolist() == rows["id"].tolist()
        assert frame["summary"].tolist() == rows["summary"].tolist()
        assert set(frame["status"]) <= {"ok", "empty", "error"}
    templates = stored("prompt_template_report")
    assert sorted(templates["template"]) == sorted(TEMPLATES)
    assert templates["rougeL"].is_monotonic_decreasing


def test_template_comparison_reuses_the_baseline_template_and_follows_its_own_config(whole_graph, materialize):
    comparison = materializations(whole_graph)["prompt_template_report"]
    assert comparison["reused_template"] == "seed" and "baseline_summaries' first 4 rows" in comparison["reuse"]
    table = stored("prompt_template_report").set_index("template")
    assert table.loc["seed", "source"] == "baseline_summaries" and set(table.drop("seed")["source"]) == {"generated"}
    first = stored("baseline_summaries").head(4)
    expected = score_pairs(first["generated"].tolist(), first["summary"].tolist()).mean()
    assert table.loc["seed", "rougeL"] == round(float(expected["rougeL"]), 4)

    shorter = {"ops": {"prompt_template_report": {"config": {"max_new_tokens": 5, "templates": ["seed", "tldr"]}}}}
    rerun = materializations(materialize("prompt_template_report", run_config=shorter))["prompt_template_report"]
    assert rerun["max_new_tokens"] == rerun["decoding"]["max_new_tokens"] == 5
    assert (
        rerun["reused_template"] == "" and rerun["reuse"] == "decoding differs from baseline_summaries (max_new_tokens)"
    )
    assert set(stored("prompt_template_report")["source"]) == {"generated"}


def test_report_holds_every_file_and_metric(whole_graph):
    report_dir = Path(materializations(whole_graph)["rouge_report"]["report_dir"])
    assert report_dir.parent == data_dir() / "reports" and report_dir.name == whole_graph.run_id
    assert sorted(p.name for p in report_dir.iterdir()) == sorted(REPORT_FILES)
    results = json.loads((report_dir / "evaluation_results.json").read_text())
    for model in ("baseline", "finetuned"):
        for name in ROUGE_TYPES:
            figure = results["rouge"][model][name]
            assert figure["low"] <= figure["mean"] <= figure["high"]
        assert sum(results["status_shares"][model].values()) == pytest.approx(1.0)
    assert set(results["relative_improvement"]) == set(ROUGE_TYPES)
    assert len(results["per_sample"]) == 8 and "finetuned_rougeLsum" in results["per_sample"][0]
    training = json.loads((report_dir / "training_metrics.json").read_text())
    assert training["trainable_parameters"] > 0
    assert "| rouge1 |" in (report_dir / "evaluation_analysis.md").read_text()
    for plot in PLOT_FILES:
        assert (report_dir / plot).read_bytes().startswith(b"\x89PNG")


def test_success_rate_check_fails_on_a_summaries_table_with_empty_generations(whole_graph):
    frame = stored("baseline_summaries")
    assert generation_success(dg.AssetKey("baseline_summaries"), frame).passed
    frame.loc[:1, ["generated", "status"]] = ["", "empty"]  # two of eight rows came back empty
    result = generation_success(dg.AssetKey("baseline_summaries"), frame)
    assert not result.passed and result.severity == dg.AssetCheckSeverity.ERROR
    assert result.metadata["empty"].value == 2 and "75.0%" in result.description


def test_a_new_adapter_requests_fresh_summaries_and_report(whole_graph, materialize, defs, instance):
    before = dg.evaluate_automation_conditions(defs=defs, instance=instance)
    materialize("lora_adapter")  # a new adapter, with its blocking checks, after the whole graph ran
    after = dg.evaluate_automation_conditions(defs=defs, instance=instance, cursor=before.cursor)
    assert after.get_num_requested(dg.AssetKey("finetuned_summaries")) == 1
    assert after.get_num_requested(dg.AssetKey("rouge_report")) == 1
    assert after.get_num_requested(dg.AssetKey("baseline_summaries")) == 0


def test_jobs_and_schedule_target_evaluation(defs):
    repository = defs.get_repository_def()
    job = defs.resolve_job_def("evaluation_job")
    nodes = {node.name for node in job.graph.node_defs}
    assert (
        set(EVALUATION_ASSETS) <= nodes
        and "baseline_summaries_generation_success_rate" in nodes
        and "lora_adapter" not in nodes
    )
    schedule = repository.get_schedule_def("weekly_reevaluation")
    assert schedule.job_name == "evaluation_job" and schedule.cron_schedule == "0 6 * * 1"
    assert "evaluation_follows_adapter" in {sensor.name for sensor in repository.sensor_defs}
