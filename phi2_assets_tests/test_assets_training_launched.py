"""`lora_adapter` with `launcher: accelerate`: real `accelerate launch` ranks under Dagster Pipes, tiny profile.

Two CPU processes train with DDP over gloo; one process must give the in-process path's adapter, file for file.
"""

from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM

from phi2_assets.io_managers import _load_record
from phi2_assets.ml.train import AdapterArtifact, adapter_parameter_count
from phi2_assets.profiles import data_dir
from phi2_assets_tests.conftest import check_results, materializations, tiny_phi

LAUNCH_METADATA = {"launcher", "processes", "distributed_backend"}


def launched(processes: int) -> dict:
    return {"ops": {"lora_adapter": {"config": {"launcher": "accelerate", "num_processes": processes}}}}


def adapter_files(path: str) -> set[str]:
    return {entry.name for entry in Path(path).iterdir()}


def tiny_base():
    """A fresh tiny base model: `adapter_parameter_count` gives it back without the adapter, so one serves many."""
    return AutoModelForCausalLM.from_pretrained(tiny_phi()[1])


@pytest.fixture(scope="module")
def data_ready(materialize):
    materialize("group:data")


def test_two_cpu_processes_train_through_pipes(materialize, instance, data_ready):
    result = materialize("lora_adapter", run_config=launched(2))

    assert result.success
    metadata = materializations(result)["lora_adapter"]
    assert metadata["processes"] == 2 and metadata["distributed_backend"] == "gloo"
    assert metadata["steps"] == 4 and metadata["tokens_per_second"] > 0  # the tiny profile's max_steps
    assert metadata["loss_curve"].startswith("![loss curve](data:image/png;base64,")
    checks = check_results(result)
    assert checks[("lora_adapter", "losses_finite")] and checks[("lora_adapter", "loads_back")]
    # rank 0's progress lines arrive in the run log through Pipes while it trains
    messages = [entry.user_message for entry in instance.all_logs(result.run_id)]
    assert any("tokens/s" in message and "ETA" in message for message in messages)
    # the IO manager stores the same record type, pointing at this run's own adapter directory
    artifact = _load_record(data_dir() / "assets" / "lora_adapter.json")
    assert isinstance(artifact, AdapterArtifact) and artifact.path.endswith(result.run_id)
    assert not list(Path(artifact.path).parent.glob(f".{result.run_id}*")), "no hand-over or rank scratch left"
    assert adapter_parameter_count(tiny_base(), artifact.path) == artifact.trainable_parameters


def test_one_process_matches_the_in_process_adapter(materialize, data_ready):
    in_process = materializations(materialize("lora_adapter"))["lora_adapter"]
    one_rank = materializations(materialize("lora_adapter", run_config=launched(1)))["lora_adapter"]

    assert set(one_rank) == set(in_process) | LAUNCH_METADATA, "the same metadata, plus how it was launched"
    assert one_rank["processes"] == 1 and one_rank["distributed_backend"] == "none"
    assert adapter_files(one_rank["path"]) == adapter_files(in_process["path"])
    assert one_rank["steps"] == in_process["steps"]
    assert one_rank["trainable_parameters"] == in_process["trainable_parameters"]
    base = tiny_base()
    for path in (in_process["path"], one_rank["path"]):
        assert adapter_parameter_count(base, path) == in_process["trainable_parameters"]
