"""Labelled positions on CPU: TRL's fused LM head projects only the positions that carry a label on CPU too.

What: TRL compacts the hidden states to labelled positions before the LM head only on Triton devices, because
elsewhere a changing number of positions recompiles XLA graphs; eager CPU has no such cost. This widens TRL's
private `_use_triton` check to the CPU for the duration of training.
When it pays: CPU training of a model with a large vocabulary (Gemma's 262k words) on prompts much longer than the
summary: scoring every position is then most of a step. The loss is the same (unlabelled positions never count).
Knob: `speedups` of the training stage; verified TRL releases only.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from phi2_assets.ml.speedups import guards


@contextlib.contextmanager
def applied() -> Iterator[None]:
    import trl.trainer.utils as trl_utils

    if not hasattr(trl_utils, "_use_triton") or not guards.requires("labelled_positions_cpu", trl=guards.TRL):
        yield
        return
    triton_only = trl_utils._use_triton
    trl_utils._use_triton = lambda device: device.type == "cpu" or triton_only(device)
    try:
        yield
    finally:
        trl_utils._use_triton = triton_only
