"""The offline profile's training as the UI runs it: the data group and `lora_adapter` with every check, in one
process, printing the adapter's metadata (train time, tokens/s, eval loss of base model vs adapter).

    PHI2_PROFILE=offline PHI2_DATA_DIR=<an empty dir> DAGSTER_HOME=<an empty dir> python bench/train_offline.py

The adapter lands under the data dir's `adapters/<run id>/`, where bench/merge_tolerance_cpu.py can take it.
"""

from __future__ import annotations

import time

import dagster as dg

from phi2_assets.definitions import defs


def main() -> None:
    started = time.monotonic()
    with dg.DagsterInstance.get() as instance:
        result = dg.materialize(
            [*defs.assets, *defs.asset_checks], selection="group:data or key:lora_adapter",
            resources=defs.resources, instance=instance,
        )
    print(f"success {result.success}; wall {(time.monotonic() - started) / 60:.1f} min"
          " (data group + training + checks)")
    for event in result.get_asset_materialization_events():
        if event.asset_key.to_user_string() == "lora_adapter":
            for key, value in event.materialization.metadata.items():
                if key != "loss_curve":
                    print(f"{key}: {value.value}")
    for check in result.get_asset_check_evaluations():
        print(f"check {check.asset_key.to_user_string()}/{check.check_name}: {'passed' if check.passed else 'FAILED'}")


if __name__ == "__main__":
    main()
