"""The `lora_adapter` asset's launched path: `accelerate launch` processes under Dagster Pipes.

The asset hands over exactly what it received (its `tokenized_xsum` input, saved beside the adapter's directory),
the settings and the paths as Pipes extras; `train_entry` runs on every rank and rank 0 reports back. The Pipes
client is a resource (`training_pipes_client`): a `dg.PipesSubprocessClient` on one host, a `PipesK8sClient`
subclass to run the same command in a GPU pod (docs/KUBERNETES.md).
"""

import dataclasses
import shutil
from collections.abc import Mapping
from pathlib import Path

import dagster as dg
import datasets

from phi2_assets.launch.train_entry import ARTIFACT_MESSAGE, TrainingJob, accelerate_command
from phi2_assets.ml.train import AdapterArtifact, TrainSettings
from phi2_assets.resources import BaseModelResource


def train_with_accelerate(
    context: dg.AssetExecutionContext,
    pipes_client: dg.PipesClient,
    base_model: BaseModelResource,
    train_dataset: datasets.Dataset,
    eval_dataset: datasets.Dataset,
    settings: TrainSettings,
    output_dir: Path,
    checkpoint_dir: Path,
    num_processes: int,
) -> tuple[AdapterArtifact, Mapping[str, dg.MetadataValue]]:
    """Train in `num_processes` launched ranks; returns the artifact rank 0 reported and the launch metadata.

    Rank 0 sends the `AdapterArtifact` as a Pipes custom message, so the asset returns the same record type to the
    IO manager and builds its metadata with the same function as in process; what only the launch knows (process
    count, backend) comes as the Pipes materialization, read with `get_materialize_result()` and merged by the asset.
    """
    if num_processes < 1:
        raise ValueError(f"num_processes must be at least 1, got {num_processes}")
    output_dir = Path(output_dir)
    handoff = output_dir.with_name(f".{output_dir.name}.inputs")
    datasets.DatasetDict({"train": train_dataset, "validation": eval_dataset}).save_to_disk(str(handoff))
    job = TrainingJob(
        model={"source": base_model.source, "name_or_path": base_model.name_or_path,
               "revision": base_model.revision, "load_in_4bit": base_model.load_in_4bit,
               "cpu_dtype": base_model.cpu_dtype},
        model_dir=base_model.model_dir(),
        datasets_dir=str(handoff),
        settings=dataclasses.asdict(settings),
        output_dir=str(output_dir),
        checkpoint_dir=str(checkpoint_dir),
    )
    command = accelerate_command(num_processes)
    context.log.info(f"launching {num_processes} training process(es): {' '.join(command)}")
    try:
        invocation = pipes_client.run(context=context, command=command, extras=dataclasses.asdict(job))
    finally:
        shutil.rmtree(handoff, ignore_errors=True)
    reported = [message[ARTIFACT_MESSAGE] for message in invocation.get_custom_messages()
                if ARTIFACT_MESSAGE in message]
    if not reported:
        raise dg.Failure(f"the training processes exited without reporting an adapter (expected under {output_dir})")
    return AdapterArtifact(**reported[-1]), invocation.get_materialize_result().metadata
