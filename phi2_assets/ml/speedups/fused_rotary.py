"""Fused rotary: Phi's partial rotary position embedding in one Triton kernel on CUDA.

What: transformers' `PhiAttention` rotates the first `rotary_ndims` dimensions of each head's query and key with a
`rotate_half` (slices, a negation, a `torch.cat`), two multiplies, an add and another `torch.cat`, each a kernel
over the whole tensor. `fused_rotary_kernel` does it in one read and one write per tensor, rounding where the eager
ops round, so the result is theirs bit for bit.
In training the rotation's backward pass is the same kernel with the sines negated (the rotation is orthogonal: its
transpose turns the other way), which also equals autograd's gradient of the eager ops bit for bit: each output
element is one product, or the sum of two, rounded where they round.
When it pays: training and generation on CUDA, a dozen kernels per layer and pass fewer. CPUs and CUDA builds
without Triton keep the eager ops.
Knob: `speedups` of the stage. It applies to `PhiAttention` only, and only while the library's
`PhiAttention.forward` is the one this module's copy was made from (checked by a fingerprint of its source).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import inspect
import logging
from collections.abc import Iterator

import torch
from transformers import PreTrainedModel
from transformers.models.phi import modeling_phi

from phi2_assets.ml.speedups import guards

log = logging.getLogger(__name__)
_HAS_TRITON = importlib.util.find_spec("triton") is not None  # CUDA builds of PyTorch on Linux ship it
# sha256 of `inspect.getsource(PhiAttention.forward)` in the verified transformers release: the copy below is it
VERIFIED_FORWARD_SOURCE = "a34f133885363e43"


def rotate_queries_and_keys(query: torch.Tensor, key: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                            rotary_dims: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`PhiAttention`'s rotation of query and key (batch, heads, positions, head_dim) by `cos` and `sin`."""
    fused = _HAS_TRITON and query.is_cuda and query.stride(-1) == key.stride(-1) == 1 and not (
        torch.is_grad_enabled() and (cos.requires_grad or sin.requires_grad))
    if not fused:
        return rotate_eagerly(query, key, cos, sin, rotary_dims)
    if torch.is_grad_enabled() and (query.requires_grad or key.requires_grad):
        return _Rotation.apply(query, key, cos, sin, rotary_dims)
    from phi2_assets.ml.speedups import fused_rotary_kernel

    return fused_rotary_kernel.rotate(query, key, cos, sin, rotary_dims)


class _Rotation(torch.autograd.Function):
    """The kernel's rotation with a backward pass: the incoming gradients rotated the other way."""

    @staticmethod
    def forward(ctx, query, key, cos, sin, rotary_dims: int):
        from phi2_assets.ml.speedups import fused_rotary_kernel

        ctx.save_for_backward(cos, sin)
        ctx.rotary_dims = rotary_dims
        return fused_rotary_kernel.rotate(query, key, cos, sin, rotary_dims)

    @staticmethod
    def backward(ctx, query_grad, key_grad):
        from phi2_assets.ml.speedups import fused_rotary_kernel

        cos, sin = ctx.saved_tensors
        query_grad = query_grad if query_grad.stride(-1) == 1 else query_grad.contiguous()
        key_grad = key_grad if key_grad.stride(-1) == 1 else key_grad.contiguous()
        query_grad, key_grad = fused_rotary_kernel.rotate(query_grad, key_grad, cos, -sin, ctx.rotary_dims)
        return query_grad, key_grad, None, None, None


def rotate_eagerly(query: torch.Tensor, key: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                   rotary_dims: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The rotation as `PhiAttention` does it, op by op."""
    query_rot, key_rot = modeling_phi.apply_rotary_pos_emb(query[..., :rotary_dims], key[..., :rotary_dims], cos, sin)
    return (torch.cat((query_rot, query[..., rotary_dims:]), dim=-1),
            torch.cat((key_rot, key[..., rotary_dims:]), dim=-1))


class FusedRotaryPhiAttention(modeling_phi.PhiAttention):
    """`PhiAttention.forward` of the verified transformers release with the rotation done by
    `rotate_queries_and_keys`."""

    def forward(self, hidden_states: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor],
                attention_mask: torch.Tensor | None, cache=None, **kwargs) -> tuple[torch.Tensor, torch.Tensor | None]:
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        query_states, key_states, value_states = (
            states.view(hidden_shape).transpose(1, 2) for states in self._project(hidden_states))
        if self.qk_layernorm:
            query_states, key_states = self.q_layernorm(query_states), self.k_layernorm(key_states)
        query_states, key_states = rotate_queries_and_keys(
            query_states, key_states, *position_embeddings, self.rotary_ndims)
        if cache is not None:
            key_states, value_states = cache.update(key_states, value_states, self.layer_idx, kwargs=kwargs)
        attention = modeling_phi.ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation,
                                                                       modeling_phi.eager_attention_forward)
        attn_output, attn_weights = attention(self, query_states, key_states, value_states, attention_mask,
                                              dropout=0.0 if not self.training else self.attention_dropout,
                                              scaling=self.scaling, **kwargs)
        return self.dense(attn_output.reshape(*input_shape, -1).contiguous()), attn_weights


    def _project(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Query, key and value projections: one matmul where `fused_qkv` stacked their weights, else three."""
        stacked = getattr(self, "qkv_weight", None)
        if stacked is None:
            return self.q_proj(hidden_states), self.k_proj(hidden_states), self.v_proj(hidden_states)
        return torch.nn.functional.linear(hidden_states, stacked, self.qkv_bias).split(self.qkv_sizes, -1)


def library_forward_matches() -> bool:
    """Whether transformers' `PhiAttention.forward` is still the code `FusedRotaryPhiAttention` copies."""
    source = inspect.getsource(modeling_phi.PhiAttention.forward)
    return hashlib.sha256(source.encode()).hexdigest()[:16] == VERIFIED_FORWARD_SOURCE


@functools.cache
def available() -> bool:
    """Verified release and unchanged forward; warns once per process when not."""
    if not guards.requires("fused_rotary", transformers=guards.TRANSFORMERS):
        return False
    if not library_forward_matches():
        log.warning("speed-up fused_rotary is off: transformers' PhiAttention.forward differs from the verified copy")
        return False
    return True


@contextlib.contextmanager
def applied(model: PreTrainedModel) -> Iterator[None]:
    """While inside, every `PhiAttention` of `model` rotates through `rotate_queries_and_keys`; other architectures
    are left as they are. The attention modules get their own class back afterwards."""
    attentions = [module for module in model.modules() if type(module) is modeling_phi.PhiAttention]
    if not attentions or not available():
        yield
        return
    for module in attentions:
        module.__class__ = FusedRotaryPhiAttention
    try:
        yield
    finally:
        for module in attentions:
            module.__class__ = modeling_phi.PhiAttention
