"""The MLflow tracking resource: one MLflow run per Dagster run, which every asset of the run finds by its tag.

`dagster-mlflow` is not used: its `mlflow_tracking` is a function-style `@resource` that proxies MLflow's global
fluent state and ends runs through an op hook, neither of which fits `ConfigurableResource` assets. The MLflow
calls live in `phi2_assets.ml.tracking`.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import dagster as dg
import pydantic
from pydantic import PrivateAttr

from phi2_assets.ml import tracking
from phi2_assets.ml.train import AdapterArtifact
from phi2_assets.profiles import PROFILE, data_dir

INSTALL_HINT = "pip install 'phi2_assets[mlflow]'"
ADAPTER_ARTIFACT = "adapter"
LOSS_CURVE_FILE = "loss_curve.png"


class MlflowTracking(dg.ConfigurableResource):
    """Params, metrics, artifacts and registered adapters of each run in MLflow; on whenever mlflow is installed."""

    enabled: bool = pydantic.Field(default=True, description="false: track nothing, even with mlflow installed")
    tracking_uri: str | None = pydantic.Field(
        default=None, description="null: MLFLOW_TRACKING_URI, else a SQLite store under <data dir>/mlflow",
    )
    experiment_name: str = "phi2_assets"
    registered_model: str | None = pydantic.Field(
        default=None, description="registered model of the adapters; null: phi2_assets-<profile>-lora",
    )

    _active: bool = PrivateAttr(default=False)
    _runs: dict = PrivateAttr(default_factory=dict)

    def setup_for_execution(self, context: dg.InitResourceContext) -> None:
        self._active = self.enabled and tracking.mlflow_installed()
        if self.enabled and not self._active:
            context.log.info(f"mlflow is not installed, so this run is not tracked ({INSTALL_HINT})")

    def teardown_after_execution(self, context: dg.InitResourceContext) -> None:
        for run in self._runs.values():
            run.finish()

    @property
    def active(self) -> bool:
        return self._active

    @property
    def model_name(self) -> str:
        return self.registered_model or f"phi2_assets-{PROFILE.name}-lora"

    def run(self, context: dg.AssetExecutionContext) -> tracking.TrackedRun | None:
        """The Dagster run's MLflow run (created by the first step that asks), or None when tracking is off."""
        if not self._active:
            return None
        if context.run_id not in self._runs:
            store = data_dir() / "mlflow"
            uri = tracking.resolve_tracking_uri(self.tracking_uri, store)
            local = uri == tracking.default_tracking_uri(store)
            if local:
                store.mkdir(parents=True, exist_ok=True)
            tags = {"profile": PROFILE.name, "base_model": PROFILE.model.name_or_path, "dagster_job": context.job_name}
            commit = tracking.git_commit(Path(__file__).parent)
            if commit:
                tags["git_commit"] = commit
            artifacts = store / "artifacts" if local else None  # a server or another store keeps its own
            self._runs[context.run_id] = tracking.open_run(uri, self.experiment_name, artifacts, context.run_id, tags)
            context.log.info(f"MLflow: {self._runs[context.run_id].link}")
        return self._runs[context.run_id]

    def record(
        self, context: dg.AssetExecutionContext, config: dg.Config | None = None,
        metrics: Mapping[str, float | None] | None = None, artifacts: Mapping[str, Path] | None = None,
    ) -> dict[str, dg.MetadataValue]:
        """Log the step's config (every field, as params prefixed by the step's name), metrics and artifacts
        (artifact folder -> local file or directory); returns the link to the MLflow run as asset metadata."""
        run = self.run(context)
        if run is None:
            return {}
        if config is not None:
            run.log_params(tracking.flat_params(context.op_def.name, config.model_dump()))
        if metrics:
            run.log_metrics(metrics)
        for artifact_path, local in (artifacts or {}).items():
            run.log_artifacts(local, artifact_path)
        kind = dg.MetadataValue.url if run.link.startswith("http") else dg.MetadataValue.text
        return {"mlflow_run": kind(run.link)}

    def trainer_callbacks(self, context: dg.AssetExecutionContext, report_to: str) -> list:
        """What `report_to` asks the trainer to report to: this run's MLflow run (when tracking is on) or TensorBoard
        logs under `<data dir>/tensorboard/<run id>`."""
        if report_to == "tensorboard":
            return [tracking.tensorboard_callback(data_dir() / "tensorboard" / context.run_id)]
        run = self.run(context) if report_to == "mlflow" else None
        return [tracking.StepMetricsCallback(run)] if run is not None else []

    def track_adapter(self, context: dg.AssetExecutionContext, artifact: AdapterArtifact, curve_png: bytes,
                      loss_history: bool) -> dict[str, dg.MetadataValue]:
        """The adapter's files and loss curve as artifacts, its figures as metrics (with the loss history when no
        callback logged it live), and a new version of the registered model; returns metadata."""
        run = self.run(context)
        if run is None:
            return {}
        if loss_history:
            for step, loss in zip(artifact.train_loss_steps, artifact.train_losses, strict=True):
                run.log_metrics({"train/loss": loss}, step=step)
            eval_points = zip([0, *artifact.eval_loss_steps], [artifact.base_eval_loss, *artifact.eval_losses],
                              strict=True)
            for step, loss in eval_points:
                run.log_metrics({"eval/loss": loss}, step=step)
        run.log_metrics({
            "adapter_eval_loss": artifact.eval_loss, "base_eval_loss": artifact.base_eval_loss,
            "perplexity": artifact.perplexity, "base_perplexity": artifact.base_perplexity,
            "tokens_per_second": artifact.tokens_per_second, "train_seconds": artifact.train_seconds,
            "trainable_parameters": artifact.trainable_parameters, "peak_memory_mb": artifact.peak_memory_mb,
        })
        run.log_artifacts(Path(artifact.path), ADAPTER_ARTIFACT)
        run.log_bytes(curve_png, f"plots/{LOSS_CURVE_FILE}")
        version = run.register(self.model_name, ADAPTER_ARTIFACT, {
            tracking.PIPELINE_RUN_TAG: context.run_id, tracking.ADAPTER_PATH_TAG: artifact.path,
            "eval_loss": f"{artifact.eval_loss:.4f}",
        })
        context.log.info(f"MLflow: adapter registered as {self.model_name} version {version}")
        return {**self.record(context), "mlflow_model_version": dg.MetadataValue.text(f"{self.model_name} v{version}")}

    def crown(self, context: dg.AssetExecutionContext, adapter_path: str, tags: Mapping[str, object]) -> str | None:
        """Move the `champion` alias to the registered version of `adapter_path`; returns the version (None when
        tracking is off or the adapter was trained while it was)."""
        run = self.run(context)
        if run is None:
            return None
        version = run.version_of(self.model_name, adapter_path)
        if version is None:
            context.log.warning(f"MLflow: {adapter_path} has no version of {self.model_name}: the alias stays")
            return None
        run.crown(self.model_name, version, {key: str(value) for key, value in tags.items()})
        context.log.info(f"MLflow: {self.model_name} version {version} is now @{tracking.CHAMPION_ALIAS}")
        return version
