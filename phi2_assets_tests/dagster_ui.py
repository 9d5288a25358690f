"""A real Dagster deployment for the UI tests: `dagster-webserver` and `dagster-daemon run` on loopback, each in its
own process group, with a temporary DAGSTER_HOME holding the tracked instance config; and a GraphQL client.

The fixtures are session-scoped (registered in conftest) so the GraphQL and the browser tests share one webserver
and one run of `phi2_pipeline`.
"""

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import dagster as dg
import pytest
import requests

from phi2_assets.launch.train_entry import free_port

REPO = Path(__file__).resolve().parents[1]
TRACKED_INSTANCE_YAML = REPO / "data" / "dagster_home" / "dagster.yaml"
PIPELINE_JOB = "phi2_pipeline"
STARTUP_TIMEOUT_S = 300
RUN_TIMEOUT_S = 600
SHUTDOWN_TIMEOUT_S = 60
TERMINAL_RUN_STATUSES = {"SUCCESS", "FAILURE", "CANCELED"}

LAUNCH_RUN = """
mutation LaunchRun($executionParams: ExecutionParams!) {
  launchRun(executionParams: $executionParams) {
    __typename
    ... on LaunchRunSuccess { run { runId status } }
    ... on RunConfigValidationInvalid { errors { message } }
    ... on PythonError { message stack }
    ... on Error { message }
  }
}"""

RUN_STATUS = """
query RunStatus($runId: ID!) {
  runOrError(runId: $runId) {
    __typename
    ... on Run { runId status stepStats { stepKey status startTime endTime } }
    ... on Error { message }
  }
}"""

RUN_MESSAGES = """
query RunMessages($runId: ID!) {
  logsForRun(runId: $runId, limit: 5000) {
    ... on EventConnection { events { __typename ... on MessageEvent { message level stepKey timestamp } } }
  }
}"""

LATEST_MATERIALIZATION = """
query LatestMaterialization($path: [String!]!) {
  assetOrError(assetKey: {path: $path}) {
    __typename
    ... on Asset {
      assetMaterializations(limit: 1) {
        runId
        metadataEntries {
          __typename label
          ... on FloatMetadataEntry { floatValue }
          ... on IntMetadataEntry { intValue }
          ... on TextMetadataEntry { text }
          ... on MarkdownMetadataEntry { mdStr }
        }
      }
    }
  }
}"""

JOB_LOCATIONS = """
{
  repositoriesOrError {
    __typename
    ... on RepositoryConnection { nodes { name location { name } jobs { name } } }
    ... on PythonError { message }
  }
}"""

LOCATION_STATUSES = """
{
  workspaceOrError {
    ... on Workspace {
      locationEntries {
        name loadStatus
        locationOrLoadError { __typename ... on PythonError { message } }
      }
    }
  }
}"""


class GraphQLError(AssertionError):
    pass


@dataclass
class DagsterDeployment:
    """The webserver and daemon processes of one temporary instance, and a GraphQL client for them."""

    root: Path
    port: int
    processes: dict[str, subprocess.Popen]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def graphql(self, query: str, **variables) -> dict:
        response = requests.post(f"{self.url}/graphql", json={"query": query, "variables": variables}, timeout=60)
        response.raise_for_status()
        body = response.json()
        if body.get("errors"):
            raise GraphQLError(f"GraphQL errors: {body['errors']}")
        return body["data"]

    def log_tail(self, name: str, lines: int = 40) -> str:
        text = (self.root / f"{name}.log").read_text(errors="replace").splitlines()
        return "\n".join(text[-lines:])

    def job_selector(self, job_name: str) -> dict:
        """The selector the UI sends: the code location and repository that hold `job_name`."""
        repositories = self.graphql(JOB_LOCATIONS)["repositoriesOrError"]
        assert repositories["__typename"] == "RepositoryConnection", repositories
        for repository in repositories["nodes"]:
            if any(job["name"] == job_name for job in repository["jobs"]):
                return {"repositoryLocationName": repository["location"]["name"],
                        "repositoryName": repository["name"], "jobName": job_name}
        raise AssertionError(f"no repository holds job {job_name!r}: {repositories}")

    def launch_run(self, job_name: str, run_config: dict) -> str:
        """`launchRun`, the mutation the Launchpad sends; returns the run id."""
        params = {"selector": self.job_selector(job_name), "runConfigData": run_config}
        launched = self.graphql(LAUNCH_RUN, executionParams=params)["launchRun"]
        assert launched["__typename"] == "LaunchRunSuccess", launched
        return launched["run"]["runId"]

    def wait_for_run(self, run_id: str, timeout_s: float = RUN_TIMEOUT_S) -> dict:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            run = self.graphql(RUN_STATUS, runId=run_id)["runOrError"]
            assert run["__typename"] == "Run", run
            if run["status"] in TERMINAL_RUN_STATUSES:
                return run
            time.sleep(1)
        raise AssertionError(f"run {run_id} not finished after {timeout_s}s; daemon log:\n{self.log_tail('daemon')}")

    def run_messages(self, run_id: str) -> list[dict]:
        events = self.graphql(RUN_MESSAGES, runId=run_id)["logsForRun"]["events"]
        return [event for event in events if "message" in event]

    def latest_materialization(self, asset_path: list[str]) -> tuple[str, dict[str, dict]]:
        """(run id, metadata entries by label) of the asset's latest materialization, as the asset page reads them."""
        asset = self.graphql(LATEST_MATERIALIZATION, path=asset_path)["assetOrError"]
        assert asset["__typename"] == "Asset", asset
        materializations = asset["assetMaterializations"]
        assert materializations, f"{'/'.join(asset_path)} has no materialization"
        [latest] = materializations
        return latest["runId"], {entry["label"]: entry for entry in latest["metadataEntries"]}

    def wait_until_loaded(self) -> None:
        """Until the webserver answers and the code location has loaded (or a process died, or time ran out)."""
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            for name, process in self.processes.items():
                if process.poll() is not None:
                    raise RuntimeError(f"{name} exited with {process.returncode}:\n{self.log_tail(name)}")
            try:
                entries = self.graphql(LOCATION_STATUSES)["workspaceOrError"]["locationEntries"]
            except (requests.ConnectionError, requests.HTTPError):
                entries = []
            if entries and all(entry["loadStatus"] == "LOADED" for entry in entries):
                errors = [e["locationOrLoadError"] for e in entries
                          if e["locationOrLoadError"]["__typename"] == "PythonError"]
                if errors:
                    raise RuntimeError(f"code location failed to load: {errors}")
                return
            time.sleep(1)
        raise RuntimeError(f"webserver not ready after {STARTUP_TIMEOUT_S}s:\n{self.log_tail('webserver')}")

    def stop(self) -> None:
        """SIGTERM each process group (the webserver's code server and the daemon's run workers are in them) and
        wait until every member has exited; SIGKILL what is left after a minute and raise, naming the groups."""
        for process in self.processes.values():
            _signal_group(process.pid, signal.SIGTERM)
        deadline = time.monotonic() + SHUTDOWN_TIMEOUT_S
        survivors = list(self.processes)
        while survivors and time.monotonic() < deadline:
            for process in self.processes.values():
                process.poll()  # reap the leaders so they stop counting as members
            survivors = [name for name, process in self.processes.items() if _group_alive(process.pid)]
            time.sleep(0.5)
        for name in survivors:
            _signal_group(self.processes[name].pid, signal.SIGKILL)
            self.processes[name].wait(timeout=10)
        if survivors:
            raise RuntimeError(f"still running {SHUTDOWN_TIMEOUT_S}s after SIGTERM in the process groups of"
                               f" {survivors}; killed")


def _signal_group(pgid: int, signum: int) -> None:
    try:
        os.killpg(pgid, signum)
    except ProcessLookupError:
        pass


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def start_deployment(root: Path) -> DagsterDeployment:
    """Webserver and daemon for the workspace README's `dagster dev` loads, on the tiny profile, with a fresh
    DAGSTER_HOME holding the tracked dagster.yaml and a fresh PHI2_DATA_DIR."""
    home = root / "dagster_home"
    home.mkdir(parents=True)
    shutil.copy(TRACKED_INSTANCE_YAML, home / "dagster.yaml")
    # Opening the instance creates its databases; left to the webserver and the daemon, both create them at once
    # and can record two schema versions ("alembic_version has more than one head").
    with dg.DagsterInstance.from_config(str(home)):
        pass
    env = {**os.environ, "DAGSTER_HOME": str(home), "PHI2_PROFILE": "tiny", "PHI2_DATA_DIR": str(root / "data"),
           "TOKENIZERS_PARALLELISM": "false",
           # Code servers otherwise wait out a 60 s grace for open RPCs (the webserver's stream) after SIGTERM.
           "DAGSTER_GRPC_SHUTDOWN_GRACE_PERIOD": "3"}
    env.pop("PHI2_XSUM_DIR", None)
    port = free_port()
    bin_dir = Path(sys.executable).parent
    commands = {
        "webserver": [str(bin_dir / "dagster-webserver"), "-h", "127.0.0.1", "-p", str(port), "-w", "workspace.yaml"],
        "daemon": [str(bin_dir / "dagster-daemon"), "run", "-w", "workspace.yaml"],
    }
    processes = {}
    for name, command in commands.items():
        with open(root / f"{name}.log", "wb") as log:
            processes[name] = subprocess.Popen(
                command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )
    deployment = DagsterDeployment(root=root, port=port, processes=processes)
    try:
        deployment.wait_until_loaded()
    except BaseException:
        deployment.stop()
        raise
    return deployment


@pytest.fixture(scope="session")
def dagster_ui() -> Iterator[DagsterDeployment]:
    root = Path(tempfile.mkdtemp(prefix="phi2_assets_ui_"))
    deployment = start_deployment(root)
    try:
        yield deployment
    finally:
        deployment.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def pipeline_run(dagster_ui: DagsterDeployment) -> dict:
    """One run of `phi2_pipeline` launched through GraphQL and finished: its `runOrError` record."""
    run_id = dagster_ui.launch_run(PIPELINE_JOB, run_config={})  # the profile's defaults, as the Launchpad opens
    run = dagster_ui.wait_for_run(run_id)
    if run["status"] != "SUCCESS":
        errors = [e["message"] for e in dagster_ui.run_messages(run_id) if e["level"] in ("ERROR", "CRITICAL")]
        pytest.fail(f"run {run_id} ended {run['status']}: {errors[-5:]}")
    return run
