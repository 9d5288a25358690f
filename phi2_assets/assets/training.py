"""The `training` group: the LoRA adapter trained on `tokenized_xsum` with the profile's recipe."""

import dataclasses

import dagster as dg
import datasets

from phi2_assets.assets.data import OWNERS
from phi2_assets.code_versions import code_version
from phi2_assets.config import LoraAdapterConfig, to_settings
from phi2_assets.launch.accelerate_pipes import train_with_accelerate
from phi2_assets.metadata import adapter_metadata
from phi2_assets.ml.export import loss_curve_png
from phi2_assets.ml.oom import train_within_memory
from phi2_assets.ml.train import AdapterArtifact, TrainSettings, train_lora
from phi2_assets.profiles import data_dir
from phi2_assets.resources import BaseModelResource
from phi2_assets.tracking import MlflowTracking


@dg.asset(
    group_name="training",
    pool="gpu",
    kinds={"pytorch", "huggingface", "peft"},
    owners=OWNERS,
    # what the ranks of `launcher: accelerate` run is part of how the adapter is made
    code_version=code_version("phi2_assets.ml.train", "phi2_assets.ml.oom", "phi2_assets.launch.train_entry"),
)
def lora_adapter(
    context: dg.AssetExecutionContext, config: LoraAdapterConfig, base_model: BaseModelResource,
    training_pipes_client: dg.ResourceParam[dg.PipesClient], mlflow_tracking: MlflowTracking,
    tokenized_xsum: datasets.DatasetDict,
) -> dg.Output[AdapterArtifact]:
    """LoRA adapter trained with TRL's SFTTrainer on the train split, loss on summary tokens only, evaluated on
    validation against the untouched base model. Progress lines (loss, lr, tokens/s, ETA) appear in the run log;
    a re-run after an interruption with the same config and data resumes from the last checkpoint. With
    `launcher: accelerate` the same training runs in `accelerate launch` processes (one per GPU, DDP) through
    Dagster Pipes, with the same progress lines and metadata. With tracking on, the config, step metrics (as
    `report_to` says), the adapter and its loss curve go to the run's MLflow run, and the adapter becomes a new
    version of the registered model."""
    settings = to_settings(TrainSettings, config)
    mlflow_tracking.record(context, config)
    # one adapter directory per run: a failed run never clobbers the last good adapter
    output_dir = data_dir() / "adapters" / context.run_id
    checkpoint_dir = data_dir() / "checkpoints" / "lora_adapter"
    context.log.info(f"base model {base_model.name_or_path} ({base_model.source}): {base_model.precision().reason}")
    launch_metadata = {}
    if config.launcher == "accelerate":
        # the launched ranks report the artifact; what only they know (processes, backend) joins the metadata
        artifact, launch_metadata = train_with_accelerate(
            context, training_pipes_client, base_model, tokenized_xsum["train"], tokenized_xsum["validation"],
            settings, output_dir, checkpoint_dir, config.num_processes,
        )
    else:
        model, tokenizer = base_model.load()
        callbacks = mlflow_tracking.trainer_callbacks(context, settings.report_to)
        artifact = train_within_memory(
            lambda attempt: train_lora(
                model, tokenizer, tokenized_xsum["train"], tokenized_xsum["validation"], attempt,
                output_dir=output_dir, checkpoint_dir=checkpoint_dir, on_log=context.log.info, callbacks=callbacks,
            ),
            settings, retry=config.retry_on_oom, say=context.log.warning,
        )
    curve = loss_curve_png(artifact)
    # launched ranks report no step metrics live: their loss history is logged from the artifact
    live = config.launcher == "in_process" and settings.report_to == "mlflow"
    tracked = mlflow_tracking.track_adapter(context, artifact, curve, loss_history=not live)
    return dg.Output(
        artifact,
        metadata={
            **adapter_metadata(artifact, curve),
            "precision": base_model.precision().reason,
            "settings": dg.MetadataValue.json(dataclasses.asdict(settings)),
            **launch_metadata,
            **tracked,
        },
    )
