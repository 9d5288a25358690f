"""Kernels ahead: generation's Triton kernels compiled in background threads while the model loads.

What: Triton compiles a kernel the first time a process launches it, or loads it from its on-disk cache where an
earlier process on the machine compiled it. On a fresh machine the compiles of the fused rotary, right-aligning and
split-KV kernels fell inside the first batch of the first generation, the GPU waiting for them. `start(config,
dtype)` launches each once on tiny tensors laid out as the model's attention lays them out (the same strides'
divisibility, dtypes and head shapes, so Triton compiles the variants generation runs), one thread per kernel under
a daemon thread, while the caller goes on loading the model; `wait()` joins them before generation's first batch.
A kernel that fails to compile here fails where generation runs it, as without this module.
When it pays: the first generation of a process on CUDA with Triton; on a machine whose on-disk cache holds the
kernels, it loads them ahead instead.
Knob: `speedups` of the generation stage.
"""

from __future__ import annotations

import importlib.util
import logging
import threading

import torch

from phi2_assets.ml.speedups.batch_planning import attention_head_dim

log = logging.getLogger(__name__)
_HAS_TRITON = importlib.util.find_spec("triton") is not None
_ROWS, _POSITIONS, _CACHE_COLUMNS = 2, 16, 64  # tiny, and multiples of 16 where the real ones are
_pending: list[threading.Thread] = []


def start(config, dtype: torch.dtype) -> None:
    """Compile, in the background, the kernels generation runs for a model of `config` in `dtype` on CUDA."""
    if not (_HAS_TRITON and torch.cuda.is_available()):
        return
    thread = threading.Thread(target=_compile_each, args=(config.get_text_config(), dtype, torch.cuda.current_device()),
                              name="kernels-ahead", daemon=True)
    thread.start()
    _pending.append(thread)


def wait() -> None:
    """Returns once every compile `start` began has ended."""
    while _pending:
        _pending.pop().join()


def _compile_each(config, dtype: torch.dtype, device: int) -> None:
    """Triton compiles in C++ and in the assembler without the GIL, so one thread per kernel compiles them side by
    side, once the driver's one-time set-up (which they share) is done."""
    try:
        import triton

        with torch.cuda.device(device):
            triton.runtime.driver.active.get_current_device()
    except Exception as error:  # noqa: BLE001 - generation compiles the kernels where it runs them
        log.warning("generation's kernels were not compiled ahead (%s); they compile on first use", error)
        return
    threads = [threading.Thread(target=_compile, args=(launch, dtype, device), name=f"kernels-ahead-{launch.__name__}")
               for launch in _launches(config)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def _compile(launch, dtype: torch.dtype, device: int) -> None:
    try:
        with torch.inference_mode(), torch.cuda.device(device):
            launch(dtype, torch.device("cuda", device))
            torch.cuda.current_stream().synchronize()
    except Exception as error:  # noqa: BLE001 - generation compiles the kernel where it runs it
        log.warning("a generation kernel was not compiled ahead (%s); it compiles on first use", error)


def _launches(config) -> list:
    """One launch per kernel (the split-KV kernel and its combining step together), each on tiny tensors laid out
    as generation lays them out for `config`."""
    from phi2_assets.ml.speedups import fused_rotary_kernel, right_aligning_kernel
    from phi2_assets.ml.speedups.decode_attention_kernel import attend_filled_columns
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

    def rotate(dtype, device):  # with PhiAttention's rotary dims
        rotary = int(head_dim * config.rope_parameters["partial_rotary_factor"])
        angles = torch.zeros(_ROWS, _POSITIONS, rotary, dtype=dtype, device=device)
        query, key, _ = projected(dtype, device)
        fused_rotary_kernel.rotate(query, key, angles, angles, rotary)

    def right_align(dtype, device):  # the rotated key is contiguous, the value a strided view
        _, key, value = projected(dtype, device)
        for states in (key.contiguous(), value):
            right_aligning_kernel.right_align(states, cache(dtype, device), lengths(device), 0)

    def attend(dtype, device):
        if dtype in (torch.bfloat16, torch.float16) and head_dim_parts(head_dim) is not None:
            query = torch.zeros(_ROWS, heads, 1, head_dim, dtype=dtype, device=device)
            keys, used = cache(dtype, device), lengths(device)
            attend_filled_columns(query, keys, keys, torch.zeros_like(used), used, head_dim ** -0.5)

    return [rotate, right_align, attend] if config.model_type == "phi" else [right_align, attend]
