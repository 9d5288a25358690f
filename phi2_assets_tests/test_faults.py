"""Faults on the tiny profile: a training process killed with SIGKILL, and what survives it."""

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from peft import PeftModel
from transformers import AutoModelForCausalLM

from phi2_assets.io_managers import _load_record
from phi2_assets.profiles import data_dir
from phi2_assets_tests.conftest import materializations, tiny_phi

# Many short steps with a checkpoint every two: the kill lands after a checkpoint and well before the end.
LONG_RUN = {"ops": {"lora_adapter": {"config": {"max_steps": 24, "save_steps": 2, "eval_steps": None,
                                                "logging_steps": 10}}}}
CHILD = textwrap.dedent(
    f"""
    import dagster as dg
    from phi2_assets.definitions import defs
    dg.materialize([*defs.assets], selection="lora_adapter", resources=defs.resources, run_config={LONG_RUN!r})
    """
)


@pytest.fixture(scope="module", autouse=True)
def trained_once(materialize):
    materialize("group:data")
    return materializations(materialize("lora_adapter"))["lora_adapter"]


def wait_for_checkpoint(process: subprocess.Popen, root: Path, timeout_s: float = 300) -> Path:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = sorted(root.glob("*/checkpoint-*/trainer_state.json"))
        if found:
            return found[0].parent
        if process.poll() is not None:
            raise AssertionError(f"training exited ({process.returncode}) before its first checkpoint")
        time.sleep(0.05)
    raise AssertionError("no checkpoint appeared")


def test_sigkill_after_a_checkpoint_resumes_and_keeps_the_last_good_adapter(materialize, trained_once):
    checkpoints = data_dir() / "checkpoints" / "lora_adapter"
    child = subprocess.Popen([sys.executable, "-c", CHILD], env=os.environ.copy(), start_new_session=True,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        checkpoint = wait_for_checkpoint(child, checkpoints)
    finally:
        os.killpg(child.pid, signal.SIGKILL)
        child.wait()
    assert child.returncode == -signal.SIGKILL

    # the last good adapter is untouched and loads
    previous = _load_record(data_dir() / "assets" / "lora_adapter.json")
    assert previous.path == trained_once["path"]
    base = AutoModelForCausalLM.from_pretrained(tiny_phi()[1])
    PeftModel.from_pretrained(base, previous.path)
    assert not list((data_dir() / "adapters").glob(".*.tmp"))

    resumed = materializations(materialize("lora_adapter", run_config=LONG_RUN))["lora_adapter"]
    assert resumed["resumed_from_step"] >= int(checkpoint.name.split("-")[1]) > 0
    assert resumed["steps"] == 24
    assert not list(checkpoints.glob("*/checkpoint-*")), "checkpoints are removed once the adapter is saved"
