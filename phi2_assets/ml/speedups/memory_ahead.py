"""Memory ahead: the device memory generation's batches take, reserved in PyTorch's allocator while the model loads.

What: PyTorch's caching allocator takes memory from the driver the first time a process needs it (`cudaMalloc`, or
mapped pages with expandable segments) and keeps it cached once freed. A process's first batch allocates its static
KV cache, tens of GB for a few hundred rows of Phi-2, from an empty allocator, so the first batch waits for the
driver while later batches and passes reuse what it took. `start(device)` allocates, in a background thread, the
share of free memory the batch planner may give one batch, and frees it at once: the allocator keeps it, and the
load's weights and the batches' caches are cut from it.
When it pays: a process's first generation on CUDA.
Costs: the process holds that memory from its load on instead of from its first batch on; the batch planner counts
it as free (`batch_planning.memory_budget`), so the batches are the same.
Knob: `speedups` of the generation stage.
"""

from __future__ import annotations

import logging
import threading
import time

import torch

from phi2_assets.ml.speedups import batch_planning

log = logging.getLogger(__name__)
_pending: list[threading.Thread] = []
_seconds: dict[str, float] = {}


def start(device: torch.device) -> None:
    """Reserve, in the background, the memory one batch of generation on `device` may take."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return
    thread = threading.Thread(target=_reserve, args=(device,), name="memory-ahead", daemon=True)
    thread.start()
    _pending.append(thread)


def wait() -> None:
    """Returns once the reservations `start` began have ended: the batch planner reads free memory after it."""
    while _pending:
        started = time.perf_counter()
        _pending.pop().join()
        _seconds["waited"] = round(time.perf_counter() - started, 3)


def seconds() -> dict[str, float]:
    """How long the reservation took in its thread (`reserve`) and how long generation waited for it (`waited`)."""
    return dict(_seconds)


def _reserve(device: torch.device) -> None:
    started = time.perf_counter()
    try:
        with torch.cuda.device(device):
            block = torch.empty(batch_planning.memory_budget(device), dtype=torch.uint8, device=device)
            del block  # the allocator keeps it cached for the process
    except RuntimeError as error:  # e.g. another process took the memory meanwhile; the batches allocate as they go
        log.warning("generation's memory was not reserved ahead (%s)", error)
    _seconds["reserve"] = round(time.perf_counter() - started, 3)
