"""The instance config DAGSTER_HOME=data/dagster_home holds, run for real: its `gpu` pool admits one step at a time.

Two steps of pool `gpu` with nothing between them run under the multiprocess executor, which would start both
at once; the pool must make one wait for the other.
"""

import shutil
import time

import dagster as dg

from phi2_assets_tests.dagster_ui import TRACKED_INSTANCE_YAML

HOLD_SECONDS = 3.0


@dg.asset(pool="gpu")
def first_gpu_step() -> None:
    time.sleep(HOLD_SECONDS)


@dg.asset(pool="gpu")
def second_gpu_step() -> None:
    time.sleep(HOLD_SECONDS)


def two_gpu_steps_job() -> dg.JobDefinition:
    definitions = dg.Definitions(
        assets=[first_gpu_step, second_gpu_step],
        jobs=[dg.define_asset_job("two_gpu_steps", executor_def=dg.multiprocess_executor)],
    )
    return definitions.resolve_job_def("two_gpu_steps")


def test_gpu_pool_runs_one_step_at_a_time(tmp_path):
    shutil.copy(TRACKED_INSTANCE_YAML, tmp_path / "dagster.yaml")
    with dg.DagsterInstance.from_config(str(tmp_path)) as instance:
        config = {"execution": {"config": {"max_concurrent": 2}}}
        with dg.execute_job(dg.reconstructable(two_gpu_steps_job), instance=instance, run_config=config) as result:
            assert result.success
            steps = sorted(instance.get_run_step_stats(result.run_id), key=lambda step: step.start_time)
        assert [limit.limit for limit in instance.event_log_storage.get_pool_limits() if limit.name == "gpu"] == [1]
    first, second = steps
    assert second.start_time >= first.end_time, "the second GPU step started while the first held the GPU"
