"""Code versions follow what the code does: a change to a stage's ML code changes its assets' versions, a
comment or docstring does not, and every asset carries one."""

import shutil

import pytest

from phi2_assets.code_versions import PACKAGES_ROOT, code_version, source_closure


@pytest.fixture
def package_copy(tmp_path):
    shutil.copytree(
        PACKAGES_ROOT / "phi2_assets", tmp_path / "phi2_assets", ignore=shutil.ignore_patterns("__pycache__")
    )
    return tmp_path


def test_every_asset_has_a_source_version(defs):
    graph = defs.resolve_asset_graph()
    versions = {key.to_user_string(): graph.get(key).code_version for key in graph.materializable_asset_keys}
    assert all(version and len(version) == 12 and version != "1" for version in versions.values()), versions
    assert versions["raw_xsum_train"] == versions["raw_xsum_test"] == code_version("phi2_assets.ml.sources")
    assert (
        len({versions[name] for name in ("raw_xsum_train", "cleaned_xsum_train", "tokenized_xsum", "lora_adapter")})
        == 4
    )


def test_the_closure_follows_imports_into_the_ml_core():
    reports = set(source_closure(["phi2_assets.ml.reports"]))
    assert {"phi2_assets.ml.reports", "phi2_assets.ml.scoring", "phi2_assets.ml.plots"} <= reports
    assert set(source_closure(["phi2_assets.ml.cleaning"])) == {"phi2_assets.ml.cleaning", "phi2_assets.ml.sources"}


def test_behaviour_changes_the_version_comments_and_docs_do_not(package_copy):
    before = code_version("phi2_assets.ml.reports", root=package_copy)
    assert before == code_version("phi2_assets.ml.reports")
    scoring = package_copy / "phi2_assets" / "ml" / "scoring.py"
    source = scoring.read_text()
    scoring.write_text(source.replace('"""ROUGE F1', '"""ROUGE F1 scores,', 1) + "\n# a comment\n")
    assert code_version("phi2_assets.ml.reports", root=package_copy) == before
    scoring.write_text(source.replace("resamples: int = 1_000", "resamples: int = 2_000"))
    assert code_version("phi2_assets.ml.reports", root=package_copy) != before
    assert code_version("phi2_assets.ml.cleaning", root=package_copy) == code_version("phi2_assets.ml.cleaning")
