"""MLflow tracking of one pipeline run: a run found again by its pipeline run id, prefixed params, step metrics from
the trainer, artifacts, and the registered adapter versions with the `champion` alias.

Everything goes through an explicit `MlflowClient` (no fluent active run, no environment variables), so steps of one
process never share hidden state. `mlflow` is an optional extra: import this module's MLflow parts only where
`mlflow_installed()` holds.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import subprocess
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path

from transformers import TrainerCallback

TRACKING_URI_ENV = "MLFLOW_TRACKING_URI"
PIPELINE_RUN_TAG = "dagster_run_id"
ADAPTER_PATH_TAG = "adapter_path"
CHAMPION_ALIAS = "champion"
# MLflow's limit for a param value (MAX_PARAM_VAL_LENGTH); longer config values are cut, never refused.
MAX_PARAM_CHARS = 6_000
# Trainer log keys and the metric names they are tracked under.
STEP_METRICS = {"loss": "train/loss", "learning_rate": "train/learning_rate", "grad_norm": "train/grad_norm",
                "eval_loss": "eval/loss"}


def mlflow_installed() -> bool:
    return importlib.util.find_spec("mlflow") is not None


def default_tracking_uri(store_dir: Path) -> str:
    """A SQLite store in `store_dir`: tracking and the model registry without a server."""
    return f"sqlite:///{Path(store_dir) / 'mlflow.db'}"


def resolve_tracking_uri(configured: str | None, store_dir: Path) -> str:
    """The configured URI, else MLFLOW_TRACKING_URI (MLflow's own convention), else `default_tracking_uri`."""
    return configured or os.environ.get(TRACKING_URI_ENV) or default_tracking_uri(store_dir)


def git_commit(directory: Path) -> str | None:
    """The commit checked out where the code lies, when it lies in a git work tree."""
    try:
        done = subprocess.run(["git", "rev-parse", "HEAD"], cwd=directory, capture_output=True, text=True, timeout=10,
                              check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def flat_params(prefix: str, values: Mapping[str, object]) -> dict[str, str]:
    """`{"lora_r": 8}` under `lora_adapter` becomes `{"lora_adapter.lora_r": "8"}`; lists and None as JSON."""
    params = {}
    for name, value in values.items():
        text = value if isinstance(value, str) else json.dumps(value, default=str)
        params[f"{prefix}.{name}"] = text[:MAX_PARAM_CHARS]
    return params


@dataclasses.dataclass
class TrackedRun:
    """The MLflow run of one pipeline run."""

    client: object  # mlflow.MlflowClient
    run_id: str
    experiment_id: str
    tracking_uri: str

    @property
    def link(self) -> str:
        """The run page where the store is a server, else how to find the run."""
        if self.tracking_uri.startswith(("http://", "https://")):
            return f"{self.tracking_uri.rstrip('/')}/#/experiments/{self.experiment_id}/runs/{self.run_id}"
        return f"run {self.run_id} in {self.tracking_uri} (mlflow ui --backend-store-uri {self.tracking_uri})"

    def log_params(self, params: Mapping[str, str]) -> None:
        """Params not yet on the run (MLflow params are immutable: a retried step logs only what is missing)."""
        from mlflow.entities import Param

        logged = self.client.get_run(self.run_id).data.params
        missing = [Param(key, value) for key, value in params.items() if key not in logged]
        for start in range(0, len(missing), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(self.run_id, params=missing[start:start + 100])

    def log_metrics(self, metrics: Mapping[str, float | None], step: int = 0) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(key, float(value), now, step) for key, value in metrics.items() if value is not None]
        if batch:
            self.client.log_batch(self.run_id, metrics=batch)

    def set_tags(self, tags: Mapping[str, str]) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(self.run_id, tags=[RunTag(key, str(value)) for key, value in tags.items()])

    def log_artifacts(self, local: Path, artifact_path: str) -> None:
        """A file or a directory's files under `artifact_path`."""
        if Path(local).is_dir():
            self.client.log_artifacts(self.run_id, str(local), artifact_path)
        else:
            self.client.log_artifact(self.run_id, str(local), artifact_path)

    def log_bytes(self, data: bytes, artifact_file: str) -> None:
        """`data` as the artifact file `artifact_file` (e.g. `plots/loss_curve.png`)."""
        target = Path(artifact_file)
        with tempfile.TemporaryDirectory() as folder:
            (Path(folder) / target.name).write_bytes(data)
            folder_in_run = None if target.parent == Path(".") else str(target.parent)
            self.client.log_artifact(self.run_id, str(Path(folder) / target.name), folder_in_run)

    def finish(self) -> None:
        self.client.set_terminated(self.run_id, "FINISHED")

    def register(self, model_name: str, artifact_path: str, tags: Mapping[str, str]) -> str:
        """A new version of `model_name` from this run's `artifact_path`; returns the version number."""
        from mlflow.exceptions import MlflowException

        try:
            self.client.get_registered_model(model_name)
        except MlflowException:
            self.client.create_registered_model(model_name, description="LoRA adapters of phi2_assets on XSum")
        source = f"{self.client.get_run(self.run_id).info.artifact_uri}/{artifact_path}"
        version = self.client.create_model_version(model_name, source, run_id=self.run_id, tags=dict(tags))
        return str(version.version)

    def version_of(self, model_name: str, adapter_path: str) -> str | None:
        """The registered version holding the adapter trained to `adapter_path`, if any."""
        from mlflow.exceptions import MlflowException

        try:
            versions = self.client.search_model_versions(f"name = '{model_name}'")
        except MlflowException:
            return None
        matching = [v for v in versions if v.tags.get(ADAPTER_PATH_TAG) == adapter_path]
        return str(max(int(v.version) for v in matching)) if matching else None

    def crown(self, model_name: str, version: str, tags: Mapping[str, str]) -> None:
        """Move the `champion` alias to `version` and tag it with the figures that won."""
        for key, value in tags.items():
            self.client.set_model_version_tag(model_name, version, key, str(value))
        self.client.set_registered_model_alias(model_name, CHAMPION_ALIAS, version)


def open_run(tracking_uri: str, experiment_name: str, artifact_root: Path | None, pipeline_run_id: str,
             tags: Mapping[str, str]) -> TrackedRun:
    """The MLflow run tagged with `pipeline_run_id` in `experiment_name`, created (with `tags`) when there is none.
    `artifact_root` is where a new experiment keeps artifacts (for a local store; a server decides its own)."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    experiment = client.get_experiment_by_name(experiment_name)
    if experiment is None:
        location = Path(artifact_root).as_uri() if artifact_root else None
        experiment_id = client.create_experiment(experiment_name, artifact_location=location)
    else:
        experiment_id = experiment.experiment_id
    found = client.search_runs([experiment_id], filter_string=f"tags.{PIPELINE_RUN_TAG} = '{pipeline_run_id}'",
                               max_results=1)
    if found:
        run_id = found[0].info.run_id
    else:
        run = client.create_run(experiment_id, run_name=pipeline_run_id,
                                tags={PIPELINE_RUN_TAG: pipeline_run_id, **tags})
        run_id = run.info.run_id
    return TrackedRun(client=client, run_id=run_id, experiment_id=experiment_id, tracking_uri=tracking_uri)


class StepMetricsCallback(TrainerCallback):
    """The trainer's logs as step metrics of a tracked run: train and eval loss, learning rate, gradient norm, and
    the tokens per second since the previous log (step 0's eval loss is the base model's)."""

    def __init__(self, run: TrackedRun):
        self.run = run
        self.last: tuple[float, int] | None = None  # (time, tokens seen) at the previous train log or the first step

    def on_step_begin(self, args, state, control, **kwargs):
        if self.last is None:
            self.last = (time.monotonic(), state.num_input_tokens_seen)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero:
            return
        logs = logs or {}
        metrics = {name: logs[key] for key, name in STEP_METRICS.items() if isinstance(logs.get(key), (int, float))}
        if "loss" in logs and self.last is not None:
            now, tokens = time.monotonic(), state.num_input_tokens_seen
            metrics["train/tokens_per_second"] = (tokens - self.last[1]) / max(now - self.last[0], 1e-9)
            self.last = (now, tokens)
        self.run.log_metrics(metrics, step=state.global_step)


def tensorboard_callback(log_dir: Path) -> TrainerCallback:
    """transformers' TensorBoard callback writing to `log_dir` (needs the `tensorboard` package)."""
    from torch.utils.tensorboard import SummaryWriter
    from transformers.integrations import TensorBoardCallback

    return TensorBoardCallback(SummaryWriter(log_dir=str(log_dir)))
