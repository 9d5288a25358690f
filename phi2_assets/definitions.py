"""The one place where assets, checks, jobs, schedules and resources are wired."""

from __future__ import annotations

import dagster as dg

from phi2_assets.assets import data, evaluation, release, training
from phi2_assets.automation import evaluation_follows_adapter, evaluation_job, phi2_pipeline, weekly_reevaluation
from phi2_assets.checks import data_checks, evaluation_checks, training_checks
from phi2_assets.io_managers import Phi2IOManager
from phi2_assets.profiles import data_dir
from phi2_assets.resources import default_resources

all_assets = dg.load_assets_from_modules([data, training, evaluation, release])

defs = dg.Definitions(
    assets=all_assets,
    asset_checks=[*data_checks, *training_checks, *evaluation_checks],
    jobs=[phi2_pipeline, evaluation_job],
    schedules=[weekly_reevaluation],
    sensors=[evaluation_follows_adapter],
    resources={**default_resources(), "io_manager": Phi2IOManager(base_dir=str(data_dir() / "assets"))},
    # Every job and the UI's launches: steps run one after another in the run's process, so the base model
    # resource loads once per run, where the multiprocess default imports torch and reloads the model in a new
    # process for every step; on one GPU, or two CPU cores, model steps could not overlap anyway.
    executor=dg.in_process_executor,
)
