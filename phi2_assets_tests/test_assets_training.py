"""`lora_adapter` materialized for real on the tiny profile, with its checks."""

import dataclasses
import json
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM

from phi2_assets.io_managers import _load_record
from phi2_assets.ml.train import AdapterArtifact, adapter_parameter_count
from phi2_assets.profiles import data_dir
from phi2_assets_tests.conftest import check_results, materializations, tiny_phi


@pytest.fixture(scope="module", autouse=True)
def tokenized(materialize):
    materialize("group:data")


def test_lora_adapter_trains_passes_its_checks_and_keeps_one_dir_per_run(materialize):
    result = materialize("lora_adapter")
    assert result.success
    metadata = materializations(result)["lora_adapter"]
    assert metadata["steps"] == 4 and metadata["resumed_from_step"] == 0  # the tiny profile's max_steps
    assert 0 < metadata["trainable_share_percent"] < 100
    assert metadata["eval_loss"] < metadata["base_eval_loss"]
    assert metadata["tokens_per_second"] > 0 and metadata["adapter_mb"] > 0
    assert metadata["loss_curve"].startswith("![loss curve](data:image/png;base64,")
    assert "fp32" in metadata["precision"] or "bf16" in metadata["precision"]
    checks = check_results(result)
    assert {name for key, name in checks if key == "lora_adapter"} == {
        "losses_finite",
        "eval_loss_below_base",
        "loads_back",
    }
    assert all(passed for (key, _), passed in checks.items() if key == "lora_adapter"), checks

    artifact = _load_record(data_dir() / "assets" / "lora_adapter.json")
    assert isinstance(artifact, AdapterArtifact)
    # the metadata is the record: every field but the loss series (plotted), under its own name
    series = {"train_loss_steps", "train_losses", "eval_loss_steps", "eval_losses"}
    assert {field.name for field in dataclasses.fields(artifact)} - series <= set(metadata)
    assert metadata["eval_loss"] == round(artifact.eval_loss, 4) and metadata["lora_r"] == artifact.lora_r
    assert metadata["target_modules"] == ", ".join(artifact.target_modules)
    assert metadata["perplexity"] == round(artifact.perplexity, 2)
    assert Path(artifact.path) == Path(metadata["path"]) == data_dir() / "adapters" / result.run_id
    base = AutoModelForCausalLM.from_pretrained(tiny_phi()[1])
    assert adapter_parameter_count(base, artifact.path) == artifact.trainable_parameters

    second = materialize("lora_adapter", run_config={"ops": {"lora_adapter": {"config": {"max_steps": 2}}}})
    assert materializations(second)["lora_adapter"]["steps"] == 2
    assert (Path(artifact.path) / "adapter_model.safetensors").is_file(), "a later run keeps the earlier adapter"


def test_impossible_settings_fail_before_training(materialize):
    result = materialize(
        "lora_adapter", run_config={"ops": {"lora_adapter": {"config": {"lora_r": 0}}}}, raise_on_error=False
    )
    assert not result.success
    failure = next(e for e in result.all_events if e.event_type_value == "STEP_FAILURE")
    assert "lora_r must be at least 1" in str(failure.event_specific_data.error)


def test_a_record_stored_by_another_version_fails_downstream_naming_the_file_and_the_fields(materialize):
    assert materialize("lora_adapter").success and materialize("evaluation_xsum").success
    stored = data_dir() / "assets" / "lora_adapter.json"
    original = stored.read_text()
    record = json.loads(original)
    del record["evaluation_seconds"]
    record["retired_figure"] = 1.0
    stored.write_text(json.dumps(record))
    try:
        result = materialize("finetuned_summaries", raise_on_error=False)
    finally:
        stored.write_text(original)
    assert not result.success
    failure = next(e for e in result.all_events if e.event_type_value == "STEP_FAILURE")
    message = str(failure.event_specific_data.error)
    assert str(stored) in message and "missing fields: evaluation_seconds" in message
    assert "unknown fields: retired_figure" in message and "materialize its asset again" in message
