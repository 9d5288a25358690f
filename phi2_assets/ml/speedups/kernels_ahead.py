"""Kernels ahead: generation's Triton kernels compiled in background threads while the model loads and prefills.

What: Triton compiles a kernel the first time a process launches it, or loads it from its on-disk cache where an
earlier process on the machine compiled it. On a fresh machine the compiles of the fused rotary, right-aligning and
split-KV kernels fell inside the first batch of the first generation, the GPU waiting for them. `start(config,
dtype)` launches each once on tiny tensors laid out as the model's attention lays them out (the same strides'
divisibility, dtypes and head shapes, so Triton compiles the variants generation runs), one thread per kernel,
while the caller goes on loading the model. Generation waits for each kernel only where it first runs it: the
prefill's kernels before the first prefill, the decoding kernels before the first decoding step, so the longest
compile (the split-KV kernel's) goes on while the GPU runs the first batch's prefill.
A kernel that fails to compile here fails where generation runs it, as without this module.
When it pays: the first generation of a process on CUDA with Triton; on a machine whose on-disk cache holds the
kernels, it loads them ahead instead.
Knob: `speedups` of the generation stage.
"""

from __future__ import annotations

import importlib.util
import logging
import threading
import time

import torch

from phi2_assets.ml.speedups.batch_planning import attention_head_dim

log = logging.getLogger(__name__)
_HAS_TRITON = importlib.util.find_spec("triton") is not None
_ROWS, _POSITIONS, _CACHE_COLUMNS = 2, 16, 64  # tiny, and multiples of 16 where the real ones are
PREFILL_KERNELS = ("rotate", "right_align")  # every forward rotates; a prefill writes the cache right-aligned
DECODING_KERNELS = ("attend_splits", "combine_splits")  # a decoding step's attention over the filled columns
_pending: dict[str, threading.Thread] = {}
_seconds: dict[str, float] = {}  # per kernel: "<name>_compile" (in its thread) and "<name>_waited" (by generation)
_driver_lock = threading.Lock()
_driver_ready = False


def start(config, dtype: torch.dtype) -> None:
    """Compile, in the background, the kernels generation runs for a model of `config` in `dtype` on CUDA."""
    if not (_HAS_TRITON and torch.cuda.is_available()):
        return
    text_config, device = config.get_text_config(), torch.cuda.current_device()
    names = [*PREFILL_KERNELS, *DECODING_KERNELS]
    if text_config.model_type != "phi":  # fused rotary is Phi's attention only
        names.remove("rotate")
    for name in names:
        thread = threading.Thread(target=_compile, args=(name, text_config, dtype, device),
                                  name=f"kernels-ahead-{name}", daemon=True)
        thread.start()
        _pending[name] = thread


def wait(*names: str) -> None:
    """Returns once the compiles `start` began of the kernels `names` (every kernel where none is named) have
    ended."""
    for name in names or list(_pending):
        thread = _pending.pop(name, None)
        if thread is not None:
            started = time.perf_counter()
            thread.join()
            _seconds[f"{name}_waited"] = round(time.perf_counter() - started, 3)


def seconds() -> dict[str, float]:
    """How long each kernel took to compile in its thread, and how long generation waited for it."""
    return dict(_seconds)


def _set_up_driver(device: int) -> None:
    """Triton's one-time driver set-up (which builds a module of its own), done by the first thread to get here."""
    global _driver_ready
    with _driver_lock:
        if not _driver_ready:
            import triton

            with torch.cuda.device(device):
                triton.runtime.driver.active.get_current_device()
            _driver_ready = True


def _compile(name: str, config, dtype: torch.dtype, device: int) -> None:
    """Triton compiles in C++ and in the assembler without the GIL, so the threads compile side by side."""
    started = time.perf_counter()
    try:
        _set_up_driver(device)
        with torch.inference_mode(), torch.cuda.device(device):
            _launches(config)[name](dtype, torch.device("cuda", device))
            torch.cuda.current_stream().synchronize()
    except Exception as error:  # noqa: BLE001 - generation compiles the kernel where it runs it
        log.warning("generation's %s kernel was not compiled ahead (%s); it compiles on first use", name, error)
    _seconds[f"{name}_compile"] = round(time.perf_counter() - started, 3)


def _launches(config) -> dict:
    """Per kernel name, a launch of it on tiny tensors laid out as generation lays them out for `config`."""
    from phi2_assets.ml.speedups import decode_attention_kernel, fused_rotary_kernel, right_aligning_kernel
    from phi2_assets.ml.speedups.filled_columns import head_dim_parts

    heads, head_dim = config.num_attention_heads, attention_head_dim(config)

    def projected(dtype, device):  # query, key and value as fused QKV's one projection gives them: strided views
        states = torch.zeros(_ROWS, _POSITIONS, 3 * heads * head_dim, dtype=dtype, device=device)
        return [part.view(_ROWS, _POSITIONS, heads, head_dim).transpose(1, 2)
                for part in states.split(heads * head_dim, dim=-1)]

    def cache(dtype, device):
        return torch.zeros(_ROWS, heads, _CACHE_COLUMNS, head_dim, dtype=dtype, device=device)

    def lengths(device):
        return torch.full((_ROWS,), _POSITIONS, dtype=torch.int32, device=device)

    def decodes(dtype):  # where the split-KV kernel is not used, decoding attends under the mask
        return dtype in (torch.bfloat16, torch.float16) and head_dim_parts(head_dim) is not None

    def rotate(dtype, device):  # with PhiAttention's rotary dims
        rotary = int(head_dim * config.rope_parameters["partial_rotary_factor"])
        angles = torch.zeros(_ROWS, _POSITIONS, rotary, dtype=dtype, device=device)
        query, key, _ = projected(dtype, device)
        fused_rotary_kernel.rotate(query, key, angles, angles, rotary)

    def right_align(dtype, device):  # the rotated key is contiguous, the value a strided view
        _, key, value = projected(dtype, device)
        for states in (key.contiguous(), value):
            right_aligning_kernel.right_align(states, cache(dtype, device), lengths(device), 0)

    def attend_splits(dtype, device):
        if decodes(dtype):
            query = torch.zeros(_ROWS, heads, 1, head_dim, dtype=dtype, device=device)
            keys, used = cache(dtype, device), lengths(device)
            decode_attention_kernel.attend_splits(query, keys, keys, torch.zeros_like(used), used, head_dim ** -0.5,
                                                  splits=1)

    def combine_splits(dtype, device):  # one split: the block of splits caches of up to 2,048 columns share
        if decodes(dtype):
            partial_max = torch.zeros(_ROWS * heads, dtype=torch.float32, device=device)
            decode_attention_kernel.combine_splits(
                torch.zeros(_ROWS * heads, head_dim, dtype=torch.float32, device=device), partial_max,
                torch.ones_like(partial_max), torch.empty(_ROWS, 1, heads, head_dim, dtype=dtype, device=device))

    return {"rotate": rotate, "right_align": right_align, "attend_splits": attend_splits,
            "combine_splits": combine_splits}
