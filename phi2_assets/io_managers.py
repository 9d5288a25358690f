"""How asset values travel: tables as Parquet, tokenized datasets as Arrow, artifacts as small JSON records.

Paths are `<data>/assets/<asset key>` (+ suffix); each write goes to a temporary sibling and is renamed into
place, so a failed step never leaves a half-written value behind for the next run to read.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
from pathlib import Path

import dagster as dg
import datasets
import pandas as pd

from phi2_assets.ml.atomic import atomic_path
from phi2_assets.profiles import inside_data_dir

RECORD_TYPE_FIELD = "__record_type__"


class Phi2IOManager(dg.ConfigurableIOManager):
    """Stores DataFrames, `datasets.DatasetDict`s and dataclass records under `base_dir`."""

    base_dir: str

    def setup_for_execution(self, context: dg.InitResourceContext) -> None:
        inside_data_dir(self.base_dir, "Phi2IOManager.base_dir")

    def _base(self, key: dg.AssetKey) -> Path:
        return Path(self.base_dir).joinpath(*key.path)

    def handle_output(self, context: dg.OutputContext, obj: object) -> None:
        base = self._base(context.asset_key)
        if isinstance(obj, pd.DataFrame):
            path = base.with_suffix(".parquet")
            with atomic_path(path) as staging:
                obj.to_parquet(staging, index=False)
        elif isinstance(obj, datasets.DatasetDict):
            path = base.with_suffix(".arrow")
            with atomic_path(path) as staging:
                obj.save_to_disk(str(staging))
        elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
            path = base.with_suffix(".json")
            record = {RECORD_TYPE_FIELD: f"{type(obj).__module__}:{type(obj).__qualname__}", **dataclasses.asdict(obj)}
            with atomic_path(path) as staging:
                staging.write_text(json.dumps(record, indent=2, default=str))
        else:
            raise TypeError(f"{context.asset_key.to_user_string()}: cannot store a {type(obj).__name__}")
        context.add_output_metadata({"stored_at": dg.MetadataValue.path(str(path))})

    def load_input(self, context: dg.InputContext) -> object:
        base = self._base(context.asset_key)
        for suffix, loader in ((".parquet", pd.read_parquet), (".arrow", _load_dataset_dict), (".json", _load_record)):
            path = base.with_suffix(suffix)
            if path.exists():
                return loader(path)
        raise FileNotFoundError(f"{context.asset_key.to_user_string()} has not been materialized under {self.base_dir}")


def _load_dataset_dict(path: Path) -> datasets.DatasetDict:
    return datasets.load_from_disk(str(path))


def _load_record(path: Path) -> object:
    data = json.loads(path.read_text())
    module_name, qualname = data.pop(RECORD_TYPE_FIELD).split(":")
    record_type = getattr(importlib.import_module(module_name), qualname)
    fields = [field for field in dataclasses.fields(record_type) if field.init]
    required = {field.name for field in fields
                if field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING}
    missing, unknown = sorted(required - data.keys()), sorted(data.keys() - {field.name for field in fields})
    if missing or unknown:
        raise ValueError(f"{path}: the stored {qualname} comes from another version of the code (missing fields: "
                         f"{', '.join(missing) or 'none'}; unknown fields: {', '.join(unknown) or 'none'}); "
                         "materialize its asset again")
    return record_type(**data)
