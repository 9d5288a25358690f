"""One rank of `accelerate launch -m phi2_assets.launch.train_entry`: load the base model, run `train_lora`.

Every rank loads the model on its own device (`models.load_model` maps it to LOCAL_RANK; 4-bit NF4 on CUDA) and
calls the same `train_lora` as the in-process asset; the Trainer sees WORLD_SIZE and wraps the model in DDP.
Rank 0 alone talks to Dagster through Pipes: progress lines as Pipes logs, the `AdapterArtifact` as a custom
message, how the run was launched as the materialization's metadata. Only `dagster_pipes` is imported, never
`dagster`, so a training image needs nothing of the orchestrator.

Outside Dagster (benchmarks): `--job job.json` gives the same parameters, `--result result.json` gets the artifact.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import shutil
import socket
import sys
from collections.abc import Callable, Mapping
from pathlib import Path

import datasets
import torch

from phi2_assets.ml import models
from phi2_assets.ml.settings import settings_from_mapping
from phi2_assets.ml.train import AdapterArtifact, TrainSettings, train_lora

ARTIFACT_MESSAGE = "adapter_artifact"
ENTRY_MODULE = "phi2_assets.launch.train_entry"


@dataclasses.dataclass(frozen=True)
class TrainingJob:
    """What every rank needs, as JSON: the Pipes extras under Dagster, or the `--job` file outside it."""

    model: dict  # ModelSpec fields but the token, which comes from the HF_TOKEN environment variable
    model_dir: str  # resolved by the orchestrator, so the GGUF conversion or tiny model is built once, there
    datasets_dir: str  # a saved DatasetDict with `train` and `validation`: exactly what the asset received
    settings: dict  # TrainSettings fields
    output_dir: str
    checkpoint_dir: str

    def train_settings(self) -> TrainSettings:
        return settings_from_mapping(TrainSettings, self.settings)

    def model_spec(self) -> models.ModelSpec:
        return models.ModelSpec(**self.model, hub_token=os.environ.get("HF_TOKEN"))


def free_port() -> int:
    """A free TCP port for the ranks' rendezvous, so two launched runs on one host never collide on 29500."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def accelerate_command(num_processes: int) -> list[str]:
    """`accelerate launch` of this module with N processes.

    N > 1 goes through `--multi_gpu` (torchrun: one process per rank); on a host without CUDA the same ranks run
    on CPU with gloo, because `train_lora` sets `use_cpu` there. `--mixed_precision no` leaves bf16 to the
    training settings, as in process.
    """
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(num_processes),
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
    ]
    if num_processes > 1:
        command += ["--multi_gpu", "--main_process_port", str(free_port())]
    else:
        # one process sees one GPU: with several visible, Trainer would wrap the model in nn.DataParallel,
        # which SFTTrainer refuses
        command += ["--gpu_ids", "0"]
    return [*command, "-m", ENTRY_MODULE]


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def run_job(job: TrainingJob, on_log: Callable[[str], None] | None) -> AdapterArtifact:
    """Load the model on this rank's device and train. Ranks other than 0 save their (identical) copy of the
    adapter to a scratch sibling that is removed at once: only rank 0 writes the asset's directory."""
    spec = job.model_spec()
    precision = spec.precision()
    if on_log:
        on_log(f"rank 0 of {os.environ.get('WORLD_SIZE', '1')}: loading {spec.name_or_path}: {precision.reason}")
    tokenizer = models.load_tokenizer(spec, job.model_dir)
    model = models.load_model(spec, job.model_dir, precision)
    splits = datasets.load_from_disk(job.datasets_dir)
    output_dir = Path(job.output_dir)
    if rank() != 0:
        output_dir = output_dir.with_name(f".{output_dir.name}.rank{rank()}")
    try:
        return train_lora(
            model, tokenizer, splits["train"], splits["validation"], job.train_settings(),
            output_dir, Path(job.checkpoint_dir), on_log,
        )
    finally:
        if rank() != 0:
            shutil.rmtree(output_dir, ignore_errors=True)


def launch_facts(job: TrainingJob) -> dict[str, object]:
    """How the run was spread, for the materialization's metadata; the precision is the ranks' own (the
    orchestrator may have no GPU, e.g. on Kubernetes)."""
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    return {
        "precision": job.model_spec().precision().reason,
        "launcher": "accelerate launch",
        "processes": int(os.environ.get("WORLD_SIZE", "1")),
        "distributed_backend": torch.distributed.get_backend() if distributed else "none",
    }


def read_pipes_extras() -> Mapping[str, object]:
    """The extras from the Pipes context, without opening the message channel: ranks other than 0 stay silent."""
    from dagster_pipes import PipesDefaultContextLoader, PipesEnvVarParamsLoader

    params = PipesEnvVarParamsLoader().load_context_params()
    with PipesDefaultContextLoader().load_context(params) as context_data:
        return context_data["extras"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--job", type=Path, help="job JSON (TrainingJob fields) when not started by Dagster Pipes")
    parser.add_argument("--result", type=Path, help="with --job: where rank 0 writes the AdapterArtifact as JSON")
    args = parser.parse_args(argv)

    if args.job:
        job = TrainingJob(**json.loads(args.job.read_text()))
        artifact = run_job(job, functools.partial(print, flush=True) if rank() == 0 else None)
        if rank() == 0 and args.result:
            args.result.write_text(json.dumps({**dataclasses.asdict(artifact), **launch_facts(job)}, indent=2))
    elif rank() != 0:
        run_job(TrainingJob(**read_pipes_extras()), on_log=None)
    else:
        # imported here so that the `--job` path (benchmarks on a bare GPU host) needs only the ML stack
        from dagster_pipes import open_dagster_pipes

        with open_dagster_pipes() as pipes:
            job = TrainingJob(**pipes.extras)
            artifact = run_job(job, pipes.log.info)
            pipes.report_custom_message({ARTIFACT_MESSAGE: dataclasses.asdict(artifact)})
            pipes.report_asset_materialization(metadata=launch_facts(job))
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()  # every rank leaves together, and at once


if __name__ == "__main__":
    main()
