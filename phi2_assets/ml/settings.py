"""Helpers for the ML core's frozen settings dataclasses: a documented field (the doc becomes the Launchpad's
description) and a dataclass built back from plain JSON-like values."""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Mapping
from typing import TypeVar

Settings = TypeVar("Settings")


def documented(text: str, default: object) -> object:
    """A dataclass field with a default and the one-line description the stage configs show."""
    return dataclasses.field(default=default, metadata={"doc": text})


def settings_from_mapping(settings_cls: type[Settings], values: Mapping[str, object]) -> Settings:
    """`settings_cls(**values)` with lists turned back into the tuples the dataclass declares (config and JSON
    have no tuples); raises ValueError for impossible values."""
    hints = typing.get_type_hints(settings_cls)
    return settings_cls(**{
        key: tuple(value) if typing.get_origin(hints[key]) is tuple and value is not None else value
        for key, value in values.items()
    })
