"""The `dg` command line on this project, as a user runs it from the repository root: `dg check defs` loads the
definitions, `dg list defs` shows every asset, check, job, schedule and sensor (tiny profile)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
DG = Path(sys.executable).with_name("dg")
# Each command imports the definitions (torch, transformers) in a fresh process; two cores shared make it slow.
DG_TIMEOUT_S = 600


@pytest.fixture(scope="module")
def dg_env(tmp_path_factory) -> dict[str, str]:
    home = tmp_path_factory.mktemp("dg_home")
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    return {**os.environ, "DAGSTER_HOME": str(home), "NO_COLOR": "1"}


def run_dg(env: dict[str, str], *arguments: str) -> subprocess.CompletedProcess:
    done = subprocess.run([str(DG), *arguments], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                          timeout=DG_TIMEOUT_S)
    assert done.returncode == 0, f"dg {' '.join(arguments)} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
    return done


def test_dg_check_defs_loads_the_project(dg_env):
    assert DG.is_file(), f"{DG} missing: the project depends on dagster-dg-cli"
    assert "All definitions loaded successfully" in run_dg(dg_env, "check", "defs").stdout


def test_dg_list_defs_shows_the_graph(dg_env, defs):
    listed = json.loads(run_dg(dg_env, "list", "defs", "--json").stdout)
    graph = defs.resolve_asset_graph()
    assets = {asset["asset_key"] for asset in listed["assets"]}
    assert assets == {key.to_user_string() for key in graph.materializable_asset_keys}
    assert {"raw_xsum_train", "cleaned_xsum_train", "lora_adapter", "rouge_report"} <= assets
    assert "cleaned_xsum_train:clean_and_disjoint" in {check["key"] for check in listed["asset_checks"]}
    assert {job["name"] for job in listed["jobs"]} >= {"phi2_pipeline", "evaluation_job"}
    assert [schedule["name"] for schedule in listed["schedules"]] == ["weekly_reevaluation"]
    assert [sensor["name"] for sensor in listed["sensors"]] == ["evaluation_follows_adapter"]
