"""Kernels ahead: generation's Triton kernels compiled in a background thread while the model loads.

What: Triton compiles a kernel the first time a process launches it, or loads it from its on-disk cache where an
earlier process on the machine compiled it. On a fresh machine the compiles of the fused rotary, right-aligning and
split-KV kernels fell inside the first batch of the first generation, the GPU waiting for them. `start(config,
dtype)` launches each once on tiny tensors laid out as the model's attention lays them out (the same strides'
divisibility, dtypes and head shapes, so Triton compiles the variants generation runs), in a daemon thread, while
the caller goes on loading the model; `wait()` joins it before generation's first batch. A kernel that fails to
compile here fails where generation runs it, as without this module.
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
    thread = threading.Thread(target=_compile, args=(config.get_text_config(), dtype, torch.cuda.current_device()),
                              name="kernels-ahead", daemon=True)
    thread.start()
    _pending.append(thread)


def wait() -> None:
    """Returns once every compile `start` began has ended."""
    while _pending:
        _pending.pop().join()


def _compile(config, dtype: torch.dtype, device: int) -> None:
    try:
        with torch.inference_mode(), torch.cuda.device(device):
            _launch_each(config, dtype, torch.device("cuda", device))
            torch.cuda.synchronize()
    except Exception as error:  # noqa: BLE001 - generation compiles the kernel where it runs it
        log.warning("generation's kernels were not compiled ahead (%s); they compile on first use", error)


def _launch_each(config, dtype: torch.dtype, device: torch.device) -> None:
    from phi2_assets.ml.speedups import fused_rotary_kernel, right_aligning_kernel
    from phi2_assets.ml.speedups.decode_attention_kernel import attend_filled_columns
    from phi2_assets.ml.speedups.filled_columns import head_dim_parts

    heads, head_dim = config.num_attention_heads, attention_head_dim(config)
    width = heads * head_dim
    # query, key and value as fused QKV's one projection gives them: views into (rows, positions, 3 x width)
    projected = torch.zeros(_ROWS, _POSITIONS, 3 * width, dtype=dtype, device=device)
    query, key, value = (part.view(_ROWS, _POSITIONS, heads, head_dim).transpose(1, 2)
                         for part in projected.split(width, dim=-1))
    if config.model_type == "phi":  # fused_rotary's kernel, with PhiAttention's rotary dims
        rotary = int(head_dim * config.rope_parameters["partial_rotary_factor"])
        angles = torch.zeros(_ROWS, _POSITIONS, rotary, dtype=dtype, device=device)
        query, key = fused_rotary_kernel.rotate(query, key, angles, angles, rotary)
    cache = torch.zeros(_ROWS, heads, _CACHE_COLUMNS, head_dim, dtype=dtype, device=device)
    lengths = torch.full((_ROWS,), _POSITIONS, dtype=torch.int32, device=device)
    for states in (key, value):  # contiguous after the rotation; a strided view
        right_aligning_kernel.right_align(states, cache, lengths, 0)
    if dtype in (torch.bfloat16, torch.float16) and head_dim_parts(head_dim) is not None:
        attend_filled_columns(query[:, :, :1].contiguous(), cache, cache, torch.zeros_like(lengths), lengths,
                              head_dim ** -0.5)
