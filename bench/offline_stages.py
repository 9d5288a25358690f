"""Where the whole `phi2_pipeline` run spends its time: each step's wall time from the run's event log.

A step's time runs from its STEP_START to its STEP_SUCCESS (or STEP_FAILURE) event, so it includes loading the
model or converting the GGUF where a step does that first. Printed beside it: the run's wall time (RUN_START to
RUN_SUCCESS), the fine-tuned and zero-shot ROUGE with their 95% intervals from `rouge_report`'s metadata, the
adapter's training figures from `lora_adapter`'s, and the load average before and after (on a shared machine the
load says how far the times are inflated).

Run the whole graph from an empty data dir and a fresh DAGSTER_HOME under WORKDIR (the first-run cost, one-time
model conversion included), then print its stages:

    python bench/offline_stages.py --workdir /tmp/offline_stages

`--cpu-dtype float32` runs in fp32 on a CPU that has native bf16 (the figures of a CPU without it).

Read a run that already happened, in the DAGSTER_HOME it was recorded in:

    DAGSTER_HOME=/tmp/off/home python bench/offline_stages.py --run-id RUN_ID
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import dagster as dg
from dagster import DagsterEventType

JOB = "phi2_pipeline"
REPO_ROOT = Path(__file__).resolve().parent.parent
INSTANCE_YAML = REPO_ROOT / "data" / "dagster_home" / "dagster.yaml"
ROUGE_KEYS = ("rouge1", "rouge2", "rougeL")
ADAPTER_KEYS = ("steps", "tokens_seen", "tokens_per_second", "train_minutes", "base_eval_loss", "eval_loss")
STEP_ENDS = {DagsterEventType.STEP_SUCCESS, DagsterEventType.STEP_FAILURE}


def load_text() -> str:
    return "load average " + ", ".join(f"{value:.2f}" for value in os.getloadavg())


def run_fresh(workdir: Path, cpu_dtype: str) -> tuple[str, float]:
    """Run the job with the `dagster` CLI as a user would, from an empty data dir and DAGSTER_HOME; the run id
    and the command's wall time."""
    shutil.rmtree(workdir, ignore_errors=True)
    home, data = workdir / "home", workdir / "data"
    home.mkdir(parents=True)
    data.mkdir()
    shutil.copy(INSTANCE_YAML, home / "dagster.yaml")
    env = {**os.environ, "DAGSTER_HOME": str(home), "PHI2_DATA_DIR": str(data), "PYTHONPATH": str(REPO_ROOT)}
    dagster_cli = Path(sys.executable).with_name("dagster")
    command = [str(dagster_cli), "job", "execute", "-m", "phi2_assets.definitions", "-j", JOB]
    if cpu_dtype != "auto":
        run_config = workdir / "run_config.json"
        run_config.write_text(json.dumps({"resources": {"base_model": {"config": {"cpu_dtype": cpu_dtype}}}}))
        command += ["-c", str(run_config)]
    print("$", f"DAGSTER_HOME={home} PHI2_DATA_DIR={data}", " ".join(command), flush=True)
    started = time.monotonic()
    subprocess.run(command, env=env, cwd=REPO_ROOT, check=False)
    wall = time.monotonic() - started
    os.environ["DAGSTER_HOME"] = str(home)
    with dg.DagsterInstance.get() as instance:
        runs = instance.get_runs(limit=1)
    if not runs:
        raise SystemExit(f"no run recorded in {home}")
    return runs[0].run_id, wall


def minutes(seconds: float) -> str:
    return f"{int(seconds // 60)} m {seconds % 60:04.1f} s"


def step_times(entries) -> list[tuple[str, float, str]]:
    """(step key, seconds, outcome) in the order the steps started."""
    starts, rows = {}, []
    for entry in entries:
        event = entry.dagster_event
        if event is None or event.step_key is None:
            continue
        if event.event_type == DagsterEventType.STEP_START:
            starts[event.step_key] = entry.timestamp
        elif event.event_type in STEP_ENDS and event.step_key in starts:
            outcome = "ok" if event.event_type == DagsterEventType.STEP_SUCCESS else "FAILED"
            rows.append((event.step_key, entry.timestamp - starts[event.step_key], outcome, starts[event.step_key]))
    return [(key, seconds, outcome) for key, seconds, outcome, _ in sorted(rows, key=lambda row: row[3])]


def run_wall(entries) -> float | None:
    stamps = {entry.dagster_event.event_type: entry.timestamp for entry in entries if entry.dagster_event}
    start, end = stamps.get(DagsterEventType.RUN_START), stamps.get(DagsterEventType.RUN_SUCCESS)
    return end - start if start and end else None


def materialized_metadata(entries) -> dict[str, dict[str, object]]:
    """The last materialization's metadata values of each asset, by asset key."""
    found = {}
    for entry in entries:
        event = entry.dagster_event
        if event is not None and event.event_type == DagsterEventType.ASSET_MATERIALIZATION:
            materialization = event.event_specific_data.materialization
            found[materialization.asset_key.to_user_string()] = {k: v.value
                                                                  for k, v in materialization.metadata.items()}
    return found


def print_report(run_id: str) -> None:
    with dg.DagsterInstance.get() as instance:
        entries = instance.all_logs(run_id)
    print(f"run {run_id}")
    print("| step | time |\n|---|---|")
    for key, seconds, outcome in step_times(entries):
        print(f"| `{key}` | {minutes(seconds)}{'' if outcome == 'ok' else ' (' + outcome + ')'} |")
    wall = run_wall(entries)
    print(f"run wall (RUN_START to RUN_SUCCESS): {minutes(wall) if wall else 'run did not succeed'}")
    metadata = materialized_metadata(entries)
    rouge = metadata.get("rouge_report", {})
    for model in ("finetuned", "baseline"):
        figures = [
            f"{name} {rouge.get(f'{model}_{name}')} "
            f"[{rouge.get(f'{model}_{name}_ci95_low')}, {rouge.get(f'{model}_{name}_ci95_high')}]"
            for name in ROUGE_KEYS
        ]
        print(f"{model}: " + "; ".join(figures))
    if rouge:
        print(f"samples {rouge.get('samples')};"
              f" relative improvement ROUGE-1 {rouge.get('relative_improvement_rouge1')}")
    adapter = metadata.get("lora_adapter", {})
    print("lora_adapter: " + ", ".join(f"{key} {adapter.get(key)}" for key in ADAPTER_KEYS))
    for asset in ("baseline_summaries", "finetuned_summaries"):
        figures = metadata.get(asset, {})
        print(f"{asset}: {figures.get('rows')} rows, {figures.get('summaries_per_second')} summaries/s, "
              f"mean words {figures.get('mean_words')}, hit token limit {figures.get('hit_token_limit_share')}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--run-id", help="read this run from $DAGSTER_HOME instead of running the job")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/offline_stages"),
                        help="emptied, then home/ and data/")
    parser.add_argument("--cpu-dtype", choices=("auto", "float32", "bfloat16"), default="auto",
                        help="the base_model resource's cpu_dtype")
    args = parser.parse_args()
    print(load_text(), "(before)")
    if args.run_id:
        print_report(args.run_id)
        return
    run_id, wall = run_fresh(args.workdir, args.cpu_dtype)
    print(load_text(), "(after)")
    print(f"command wall (process start to exit): {minutes(wall)}")
    print_report(run_id)


if __name__ == "__main__":
    main()
