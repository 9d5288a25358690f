"""Stage configs for the Launchpad, generated from the ML core's settings dataclasses.

Each `dg.Config` has exactly the fields of its settings dataclass, with the active profile's values as
defaults, so a knob is declared once. Dagster rejects unknown keys; the dataclass rejects impossible values
when the asset converts the config, before any model is loaded.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Literal

import dagster as dg
import pydantic

from phi2_assets.ml.cleaning import CleaningSettings
from phi2_assets.ml.export import ExportSettings
from phi2_assets.ml.generate import EvaluationSetSettings, GenerationSettings, TemplateComparisonSettings
from phi2_assets.ml.settings import Settings, settings_from_mapping
from phi2_assets.ml.tokenization import TokenizeSettings
from phi2_assets.ml.train import TrainSettings
from phi2_assets.profiles import PROFILE


def _launchpad_type(annotation: object) -> object:
    """Tuples become lists in config; everything else keeps its type."""
    if typing.get_origin(annotation) is tuple:
        return list[typing.get_args(annotation)[0]]
    return annotation


def config_class(
    name: str, settings_cls: type, defaults: object, doc: str,
    base: type[dg.Config] = dg.Config, leave_out: frozenset[str] = frozenset(),
) -> type[dg.Config]:
    """A config with the fields of `settings_cls` (less `leave_out`) on top of `base`'s."""
    hints = typing.get_type_hints(settings_cls)
    fields = {}
    for field in dataclasses.fields(settings_cls):
        if field.name in leave_out:
            continue
        default = getattr(defaults, field.name)
        if isinstance(default, tuple):
            default = list(default)
        fields[field.name] = (
            _launchpad_type(hints[field.name]),
            pydantic.Field(default=default, description=field.metadata.get("doc")),
        )
    return pydantic.create_model(name, __base__=base, __module__=__name__, __doc__=doc, **fields)


def to_settings(settings_cls: type[Settings], config: dg.Config) -> Settings:
    """The validated settings dataclass for a run's config (raises ValueError for impossible values).

    Fields a stage's config adds beside its settings (`LoraAdapterConfig.launcher`) are not passed on."""
    return settings_from_mapping(
        settings_cls, config.model_dump(include={f.name for f in dataclasses.fields(settings_cls)})
    )


CleaningConfig = config_class("CleaningConfig", CleaningSettings, PROFILE.cleaning, "Cleaning rules and sample caps")
TokenizeConfig = config_class(
    "TokenizeConfig", TokenizeSettings, PROFILE.tokenize, "Prompt template and sequence length"
)
EvaluationSetConfig = config_class(
    "EvaluationSetConfig", EvaluationSetSettings, PROFILE.evaluation_set, "Which cleaned rows are evaluated"
)
SummariesConfig = config_class(
    "SummariesConfig", GenerationSettings, PROFILE.generation, "Decoding of the evaluation summaries"
)
# The comparison decodes like the summaries (same defaults), except that each compared template replaces `template`.
TemplateDecodingConfig = config_class(
    "TemplateDecodingConfig",
    GenerationSettings,
    PROFILE.generation,
    "Decoding of the template comparison",
    leave_out=frozenset({"template"}),
)
TemplateComparisonConfig = config_class(
    "TemplateComparisonConfig",
    TemplateComparisonSettings,
    PROFILE.template_comparison,
    "Templates compared zero-shot, and their decoding",
    base=TemplateDecodingConfig,
)
ExportConfig = config_class("ExportConfig", ExportSettings, PROFILE.export, "What the export holds, where it goes")
TrainConfig = config_class(
    "TrainConfig", TrainSettings, PROFILE.train, "LoRA and optimizer settings of the adapter's training run"
)


class LoraAdapterConfig(TrainConfig):
    """The training settings, and where the training runs."""

    launcher: Literal["in_process", "accelerate"] = pydantic.Field(
        default="in_process",
        description=(
            "in_process: in the step's own process; accelerate: `accelerate launch` ranks through Dagster Pipes, "
            "one per GPU (DDP)"
        ),
    )
    num_processes: int = pydantic.Field(
        default=1, description="with launcher accelerate: how many processes (GPUs) train"
    )
    retry_on_oom: bool = pydantic.Field(
        default=True,
        description=(
            "in process: after CUDA out-of-memory, retry at half the micro-batch and double the accumulation "
            "(same effective batch)"
        ),
    )
