"""Version guards: a speed-up that reaches into a library runs only on the library versions it was verified with.

Outside them it turns itself off with one warning naming the package and version, and the stage runs the stock
path: no speed-up ever computes with a copy of library code that no longer matches the library.
"""

from __future__ import annotations

import functools
import logging
from importlib import metadata

from packaging.specifiers import SpecifierSet
from packaging.version import Version

log = logging.getLogger(__name__)

# The releases every speed-up was verified against (the tested set in constraints.txt lies inside these).
TRANSFORMERS = ">=5.24,<5.25"
TRL = ">=1.16,<1.17"
TORCH = ">=2.11,<2.14"
PEFT = ">=0.21,<0.22"
BITSANDBYTES = ">=0.50,<0.51"


def installed_version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def outside_verified(requirements: dict[str, str]) -> str | None:
    """The first requirement the installed packages miss, said in words; None when all are met."""
    for package, specifier in requirements.items():
        version = installed_version(package)
        if version is None:
            return f"{package} is not installed"
        release = Version(Version(version).base_version)  # a local build such as 2.13.0+cpu is its release
        if release not in SpecifierSet(specifier):
            return f"{package} {version} is outside the verified {specifier}"
    return None


@functools.cache
def verified(technique: str, requirements: tuple[tuple[str, str], ...]) -> bool:
    """Whether `technique` may run here; warns once per process when it may not."""
    problem = outside_verified(dict(requirements))
    if problem:
        log.warning("speed-up %s is off: %s; the stage runs the stock path", technique, problem)
    return problem is None


def requires(technique: str, **requirements: str) -> bool:
    """`verified` with package names as keywords (`requires("lean_steps", transformers=TRANSFORMERS)`)."""
    return verified(technique, tuple(sorted(requirements.items())))
