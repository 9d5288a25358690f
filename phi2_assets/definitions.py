"""The one place where assets, checks, jobs, schedules and resources are wired."""

from __future__ import annotations

import dagster as dg

from phi2_assets.assets import data, training
from phi2_assets.checks import data_checks, training_checks
from phi2_assets.io_managers import Phi2IOManager
from phi2_assets.profiles import data_dir
from phi2_assets.resources import default_resources

all_assets = dg.load_assets_from_modules([data, training])

phi2_pipeline = dg.define_asset_job(
    "phi2_pipeline",
    selection=dg.AssetSelection.all(),
    description="The whole graph in one run: data, training, evaluation.",
)

defs = dg.Definitions(
    assets=all_assets,
    asset_checks=[*data_checks, *training_checks],
    jobs=[phi2_pipeline],
    resources={**default_resources(), "io_manager": Phi2IOManager(base_dir=str(data_dir() / "assets"))},
)
