"""Tracking, the champion and the export, for real: the tiny graph runs twice against a real `mlflow server` on
loopback (the second time with a worse training config), and everything is read back through `MlflowClient`,
the export folder and a headless Chromium on MLflow's run comparison page."""

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import dagster as dg
import pandas as pd
import pytest
import torch
from huggingface_hub import ModelCard
from mlflow import MlflowClient
from playwright.sync_api import expect, sync_playwright
from transformers import AutoModelForCausalLM, GenerationConfig

from phi2_assets.ml import generate, models, tracking
from phi2_assets.ml.reports import REPORT_FILES
from phi2_assets.ml.scoring import ROUGE_TYPES
from phi2_assets.profiles import PROFILE, data_dir
from phi2_assets.resources import ModelHub
from phi2_assets.tracking import MlflowTracking
from phi2_assets_tests.conftest import materializations, tiny_phi
from phi2_assets_tests.test_ui_browser import CHROMIUM_FLAGS, UI_TIMEOUT_MS

EXPERIMENT = "release_tests"
# Ten times lower learning rate, half the steps: the adapter moves less from the random base.
WORSE_TRAINING = {"learning_rate": 1e-3, "max_steps": 2}
COMPARE_VIEWPORT = {"width": 1500, "height": 1750}


@dataclass
class TrackedRuns:
    better: dg.ExecuteInProcessResult
    worse: dg.ExecuteInProcessResult
    client: MlflowClient
    model_name: str

    def mlflow_run(self, result: dg.ExecuteInProcessResult):
        experiment = self.client.get_experiment_by_name(EXPERIMENT)
        [run] = self.client.search_runs(
            [experiment.experiment_id], filter_string=f"tags.{tracking.PIPELINE_RUN_TAG} = '{result.run_id}'",
        )
        return run


@pytest.fixture(scope="module")
def resources(mlflow_server, defs) -> dict:
    tracker = MlflowTracking(tracking_uri=mlflow_server.url, experiment_name=EXPERIMENT)
    # no token, whatever the environment holds: nothing here may reach the hub
    return {**defs.resources, "mlflow_tracking": tracker, "model_hub": ModelHub(token=None)}


@pytest.fixture(scope="module")
def run_graph(defs, instance, resources):
    def run(selection: str, run_config: dict | None = None, raise_on_error: bool = True, **overrides):
        return dg.materialize(
            [*defs.assets, *defs.asset_checks], selection=selection, resources={**resources, **overrides},
            instance=instance, run_config=run_config or {}, raise_on_error=raise_on_error,
        )

    return run


@pytest.fixture(scope="module")
def runs(mlflow_server, resources, run_graph) -> TrackedRuns:
    shutil.rmtree(data_dir() / "champions", ignore_errors=True)  # a fresh champion history for this data dir
    better = run_graph("*")
    worse = run_graph("*", {"ops": {"lora_adapter": {"config": WORSE_TRAINING}}})
    return TrackedRuns(better, worse, MlflowClient(mlflow_server.url), resources["mlflow_tracking"].model_name)


def test_each_dagster_run_is_one_mlflow_run_with_every_stage_config(runs):
    for result, learning_rate in ((runs.better, PROFILE.train.learning_rate), (runs.worse, 1e-3)):
        run = runs.mlflow_run(result)
        assert run.info.run_name == result.run_id
        assert run.data.tags["profile"] == "tiny" and run.data.tags["base_model"] == PROFILE.model.name_or_path
        assert re.fullmatch(r"[0-9a-f]{40}", run.data.tags["git_commit"])
        params = run.data.params
        assert float(params["lora_adapter.learning_rate"]) == learning_rate
        assert params["lora_adapter.report_to"] == "mlflow" and params["lora_adapter.launcher"] == "in_process"
        assert params["cleaned_xsum.train_samples"] == str(PROFILE.cleaning.train_samples)
        assert params["tokenized_xsum.max_length"] == str(PROFILE.tokenize.max_length)
        assert params["evaluation_xsum.split"] == "test"
        for stage in ("baseline_summaries", "finetuned_summaries"):
            assert params[f"{stage}.max_new_tokens"] == str(PROFILE.generation.max_new_tokens)
        assert json.loads(params["prompt_template_report.templates"]) == list(PROFILE.template_comparison.templates)
        assert params["exported_model.merge"] == "true"
        assert run.info.status == "FINISHED"


def test_trainer_step_metrics_make_a_loss_history(runs):
    run_id = runs.mlflow_run(runs.better).info.run_id
    losses = runs.client.get_metric_history(run_id, "train/loss")
    assert [point.step for point in losses] == [1, 2, 3, 4]  # logging_steps 1, max_steps 4
    evals = sorted(point.step for point in runs.client.get_metric_history(run_id, "eval/loss"))
    assert evals[0] == 0 and 4 in evals  # step 0 is the base model
    for name in ("train/learning_rate", "train/tokens_per_second"):
        history = runs.client.get_metric_history(run_id, name)
        assert len(history) == 4 and all(point.value > 0 for point in history)
    adapter = materializations(runs.better)["lora_adapter"]
    tracked_loss = runs.mlflow_run(runs.better).data.metrics["adapter_eval_loss"]
    assert tracked_loss == pytest.approx(adapter["eval_loss"], abs=1e-4)


def test_rouge_metrics_and_artifacts_are_on_the_run(runs):
    run = runs.mlflow_run(runs.better)
    report = materializations(runs.better)["rouge_report"]
    for model in ("baseline", "finetuned"):
        for name in ROUGE_TYPES:
            mean = run.data.metrics[f"{model}_{name}"]
            assert mean == pytest.approx(report[f"{model}_{name}"], abs=1e-4)
            assert run.data.metrics[f"{model}_{name}_ci95_low"] <= mean <= run.data.metrics[f"{model}_{name}_ci95_high"]
        assert 0 <= run.data.metrics[f"{model}_success_rate"] <= 1

    def files(path: str) -> set[str]:
        return {Path(item.path).name for item in runs.client.list_artifacts(run.info.run_id, path)}

    assert {"adapter_model.safetensors", "adapter_config.json"} <= files("adapter")
    assert set(REPORT_FILES) <= files("report")
    assert files("plots") == {"loss_curve.png"} and files("export") == {"README.md"}


def test_every_adapter_is_a_version_and_the_champion_alias_is_on_the_better_one(runs):
    versions = runs.client.search_model_versions(f"name = '{runs.model_name}'")
    by_run = {version.run_id: version for version in versions}
    better, worse = (runs.mlflow_run(result) for result in (runs.better, runs.worse))
    assert len(versions) == 2 and set(by_run) == {better.info.run_id, worse.info.run_id}
    champion = runs.client.get_model_version_by_alias(runs.model_name, tracking.CHAMPION_ALIAS)
    assert champion.run_id == better.info.run_id
    assert better.data.metrics["finetuned_rougeL"] > worse.data.metrics["finetuned_rougeL"]

    first, second = (materializations(result)["champion_adapter"] for result in (runs.better, runs.worse))
    assert first["winner"] == "challenger" and first["margin_rougeL"] is None
    assert second["winner"] == "champion" and second["margin_rougeL"] < 0
    assert second["champion_adapter"] == by_run[better.info.run_id].tags[tracking.ADAPTER_PATH_TAG]
    assert "champion_version" not in second  # the alias stayed where it was


def test_dagster_metadata_links_to_the_mlflow_run(runs, mlflow_server):
    run = runs.mlflow_run(runs.better)
    for asset, metadata in materializations(runs.better).items():
        if asset.startswith("raw_xsum"):
            continue  # no config, nothing tracked
        assert metadata["mlflow_run"] == (
            f"{mlflow_server.url}/#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}"
        ), asset
    assert materializations(runs.better)["lora_adapter"]["mlflow_model_version"].endswith(" v1")


def test_export_holds_a_hub_model_card_and_the_evaluated_decoding(runs):
    export_dir = Path(materializations(runs.better)["exported_model"]["path"])
    assert export_dir == data_dir() / "exports" / runs.better.run_id
    names = {str(p.relative_to(export_dir)) for p in export_dir.rglob("*") if p.is_file()}
    assert {"README.md", "adapter_model.safetensors", "adapter_config.json", "generation_config.json",
            "loss_curve.png", "merged/model.safetensors", "merged/config.json"} <= names
    card = ModelCard.load(export_dir / "README.md")
    assert card.data.base_model == PROFILE.model.name_or_path and card.data.library_name == "peft"
    assert card.data.datasets == ["EdinburghNLP/xsum"] and "lora" in card.data.tags and card.data.license
    results = json.loads((Path(materializations(runs.better)["rouge_report"]["report_dir"])
                          / "evaluation_results.json").read_text())
    scores = {result.metric_name: result.metric_value for result in card.data.eval_results}
    assert scores["ROUGE-L"] == pytest.approx(results["rouge"]["finetuned"]["rougeL"]["mean"], abs=1e-4)
    assert set(scores) == {"ROUGE-1", "ROUGE-2", "ROUGE-L", "ROUGE-Lsum"}
    assert "| ROUGE-L |" in card.text and "![loss curve](loss_curve.png)" in card.text and "| lora_r | 8 |" in card.text
    decoding = GenerationConfig.from_pretrained(export_dir)
    assert decoding.max_new_tokens == PROFILE.generation.max_new_tokens and decoding.num_beams == 1
    assert not decoding.do_sample


def test_merged_model_gives_the_greedy_summaries_of_base_plus_adapter(runs):
    export_dir = Path(materializations(runs.better)["exported_model"]["path"])
    spec, model_dir = tiny_phi()
    tokenizer = models.load_tokenizer(spec, model_dir)
    articles = pd.read_parquet(data_dir() / "assets" / "evaluation_xsum.parquet")["document"].tolist()
    base = models.load_model(spec, model_dir, spec.precision())
    with models.adapted(base, export_dir) as with_adapter:
        adapted = generate.generate_summaries(with_adapter, tokenizer, articles, PROFILE.generation)
    merged = AutoModelForCausalLM.from_pretrained(export_dir / "merged", dtype=torch.float32)
    assert not any("lora" in name for name, _ in merged.named_parameters())
    from_merged = generate.generate_summaries(merged, tokenizer, articles, PROFILE.generation)
    assert [r.text for r in from_merged.records] == [r.text for r in adapted.records]


def test_the_cards_loading_snippet_loads_the_export(runs):
    export_dir = Path(materializations(runs.better)["exported_model"]["path"])
    snippet = re.search(r"```python\n(.*?)```", (export_dir / "README.md").read_text(), re.DOTALL).group(1)
    assert len(snippet.strip().splitlines()) == 3 and str(export_dir) in snippet
    loaded: dict = {}
    exec(snippet, loaded)  # noqa: S102  (the card's own code, on the files it describes)
    assert type(loaded["model"]).__name__ == "PeftModelForCausalLM"
    assert loaded["tokenizer"].eos_token == models.TINY_END_OF_TEXT


def test_push_to_hub_without_a_token_fails_before_anything_is_written(runs, run_graph):
    result = run_graph("exported_model", {"ops": {"exported_model": {"config": {"push_to_hub": "someone/tiny-xsum"}}}},
                       raise_on_error=False)
    assert not result.success
    [failure] = [event for event in result.all_events if event.is_step_failure]
    message = failure.step_failure_data.error.message + str(failure.step_failure_data.user_failure_data)
    assert "HF_TOKEN" in message and "someone/tiny-xsum" in message
    assert not (data_dir() / "exports" / result.run_id).exists()


def test_tensorboard_logs_land_under_the_data_dir(runs, run_graph):
    result = run_graph("lora_adapter", {"ops": {"lora_adapter": {"config": {"report_to": "tensorboard"}}}})
    events = list((data_dir() / "tensorboard" / result.run_id).glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0
    run = runs.client.search_runs(
        [runs.client.get_experiment_by_name(EXPERIMENT).experiment_id],
        filter_string=f"tags.{tracking.PIPELINE_RUN_TAG} = '{result.run_id}'",
    )[0]
    assert len(runs.client.get_metric_history(run.info.run_id, "train/loss")) == 4  # from the artifact, not live
    assert runs.client.get_metric_history(run.info.run_id, "train/learning_rate") == []


def test_tracking_disabled_logs_nothing(runs, run_graph):
    result = run_graph("evaluation_xsum", mlflow_tracking=MlflowTracking(enabled=False))
    assert "mlflow_run" not in materializations(result)["evaluation_xsum"]
    assert runs.client.search_runs(
        [runs.client.get_experiment_by_name(EXPERIMENT).experiment_id],
        filter_string=f"tags.{tracking.PIPELINE_RUN_TAG} = '{result.run_id}'",
    ) == []


def test_mlflow_compares_the_two_runs_in_a_browser(runs, mlflow_server, chromium, tmp_path):
    """MLflow's run comparison page in headless Chromium (the `chromium` fixture finds or installs it), set up as a
    reader would: the params that differ, the metrics that differ, and the parallel-coordinates plot of both against
    the fine-tuned ROUGE-L."""
    better, worse = (runs.mlflow_run(result) for result in (runs.better, runs.worse))
    run_ids, experiment_ids = [better.info.run_id, worse.info.run_id], [better.info.experiment_id]
    query = f"runs={json.dumps(run_ids)}&experiments={json.dumps(experiment_ids)}"
    with sync_playwright() as driver:
        browser = driver.chromium.launch(executable_path=chromium, args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page(viewport=COMPARE_VIEWPORT)
            page.set_default_timeout(UI_TIMEOUT_MS)
            expect.set_options(timeout=UI_TIMEOUT_MS)
            page.goto(f"{mlflow_server.url}/#/compare-runs?{query}")
            for text in (runs.better.run_id, runs.worse.run_id, "lora_adapter.learning_rate"):
                expect(page.get_by_text(text, exact=True).first).to_be_attached()
            _show_what_differs(page)
            expect(page.get_by_role("link", name="adapter_eval_loss", exact=True)).to_be_attached()
            page.screenshot(path=tmp_path / "mlflow_compare.png", full_page=True)
        finally:
            browser.close()
    assert (tmp_path / "mlflow_compare.png").read_bytes().startswith(b"\x89PNG")


def _show_what_differs(page) -> None:
    """Close the assistant panel, show only what differs, and plot the fine-tuned ROUGE-L (it replaces the first
    metric MLflow picks)."""
    close = page.get_by_role("button", name="Close")
    if close.count():
        close.first.click()
    for section in ("Parameters", "Metrics", "Tags"):
        page.get_by_role("switch", name=f"{section} - Show diff only").click()
    page.get_by_role("combobox").nth(1).click()
    page.keyboard.press("Backspace")
    page.keyboard.type("finetuned_rougeL")
    page.keyboard.press("Enter")
    page.keyboard.press("Escape")
    page.get_by_text("Comparing 2 Runs").click()
    expect(page.get_by_text("Metrics:").locator("xpath=..")).to_contain_text("finetuned_rougeL")
