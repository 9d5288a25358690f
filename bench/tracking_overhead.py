"""What MLflow tracking costs the whole graph: `phi2_pipeline`'s assets materialized with tracking off and on
(the local SQLite store under the data dir), alternately, in one process, so the base model loads once.

The first tracked run also creates the store (MLflow's schema migrations) and is reported apart. The profile is
PHI2_PROFILE's; the data dir a fresh temporary one unless PHI2_DATA_DIR is set.

    PHI2_PROFILE=tiny python bench/tracking_overhead.py [--rounds 4]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

os.environ.setdefault("PHI2_DATA_DIR", tempfile.mkdtemp(prefix="tracking_overhead_"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# imported after the data dir is chosen: phi2_assets reads it at import
import dagster as dg

from phi2_assets.definitions import defs
from phi2_assets.profiles import PROFILE, data_dir
from phi2_assets.tracking import MlflowTracking

TRACKED_STEPS = ("lora_adapter", "rouge_report", "exported_model", "champion_adapter")


def run_graph(instance: dg.DagsterInstance, tracking_on: bool) -> tuple[float, dict[str, float]]:
    """(wall seconds, seconds by step) of one run of the whole graph."""
    resources = {**defs.resources, "mlflow_tracking": MlflowTracking(enabled=tracking_on)}
    started = time.perf_counter()
    result = dg.materialize([*defs.assets, *defs.asset_checks], selection="*", resources=resources, instance=instance)
    seconds = time.perf_counter() - started
    steps = {event.step_key: event.event_specific_data.duration_ms / 1000
             for event in result.all_events if event.is_step_success}
    return seconds, steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=4, help="off/on pairs after the warm-up run")
    args = parser.parse_args()
    print(f"profile {PROFILE.name}, data dir {data_dir()}, load {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    with dg.DagsterInstance.ephemeral() as instance:
        warm_up, _ = run_graph(instance, tracking_on=False)
        print(f"warm-up run (tracking off, loads the model): {warm_up:.1f} s")
        first, _ = run_graph(instance, tracking_on=True)
        print(f"first tracked run (creates the SQLite store): {first:.1f} s")
        totals: dict[bool, list[float]] = {False: [], True: []}
        steps: dict[bool, list[dict[str, float]]] = {False: [], True: []}
        for _ in range(args.rounds):
            for tracking_on in (False, True):
                seconds, by_step = run_graph(instance, tracking_on)
                totals[tracking_on].append(seconds)
                steps[tracking_on].append(by_step)
    for tracking_on in (False, True):
        runs, median = ", ".join(f"{t:.1f}" for t in totals[tracking_on]), statistics.median(totals[tracking_on])
        print(f"tracking {'on ' if tracking_on else 'off'}: {runs} s (median {median:.1f})")
    print(f"overhead per run, medians: {statistics.median(totals[True]) - statistics.median(totals[False]):+.1f} s")
    for step in (*TRACKED_STEPS, "all steps"):
        off, on = (statistics.median(sum(s for k, s in run.items() if step in (k, "all steps")) for run in steps[flag])
                   for flag in (False, True))
        print(f"  {step}: {off:.2f} s off, {on:.2f} s on ({on - off:+.2f}), medians")
    print(f"load {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
