"""Training outside the Dagster process: `accelerate launch` (one process per GPU) under Dagster Pipes.

`train_entry` is what each rank runs; it imports `dagster_pipes` but not `dagster`. `accelerate_pipes` is the
Dagster side that the `lora_adapter` asset calls when its config says `launcher: accelerate`.
"""
