"""GELU epilogue: in generation, each Phi MLP's first projection and its tanh GELU as one cuBLASLt matmul.

What: `PhiMLP` writes its 10,240-wide first projection to memory, reads it back for the activation and writes it
again; on CUDA, `torch._addmm_activation(..., use_gelu=True)` applies the tanh approximation of GELU (Phi's
`gelu_new`) in the matmul's epilogue, on the fp32 sums before they are rounded to bf16: one kernel and one write
instead of two kernels and three passes, and one node less per layer in a decoding step's CUDA graph. Rounding
once instead of twice, the activations agree with the two-kernel path to bf16 rounding.
When it pays: batched generation on CUDA with the dense (merged) model. Training keeps the eager ops (the epilogue
has no backward here), and CPUs too (there the op applies the exact erf GELU instead).
Knob: `speedups` of the generation stage; verified torch releases only (the op is private).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.activations import GELUTanh, NewGELUActivation
from transformers.models.phi import modeling_phi

from phi2_assets.ml.speedups import guards


def available() -> bool:
    return hasattr(torch, "_addmm_activation") and guards.requires("gelu_epilogue", torch=guards.TORCH)


class GeluEpiloguePhiMLP(modeling_phi.PhiMLP):
    """`PhiMLP` whose first projection and activation run as one matmul on CUDA without gradients."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if not hidden_states.is_cuda or torch.is_grad_enabled():
            return super().forward(hidden_states)
        flat = hidden_states.reshape(-1, hidden_states.shape[-1])
        activated = torch._addmm_activation(self.fc1.bias, flat, self.fc1.weight.t(), use_gelu=True)
        return self.fc2(activated.view(*hidden_states.shape[:-1], -1))


def _fusable(mlp: nn.Module) -> bool:
    tanh_gelu = isinstance(mlp.activation_fn, (GELUTanh, NewGELUActivation))
    return tanh_gelu and type(mlp.fc1) is nn.Linear and mlp.fc1.bias is not None and mlp.fc1.weight.is_cuda


@contextlib.contextmanager
def applied(model: PreTrainedModel) -> Iterator[None]:
    """While inside, every CUDA `PhiMLP` of `model` with a plain first projection and a tanh GELU runs the fused
    forward; the MLPs get their own class back afterwards."""
    mlps = [module for module in model.modules() if type(module) is modeling_phi.PhiMLP and _fusable(module)]
    if not mlps or not available():
        yield
        return
    for mlp in mlps:
        mlp.__class__ = GeluEpiloguePhiMLP
    try:
        yield
    finally:
        for mlp in mlps:
            mlp.__class__ = modeling_phi.PhiMLP
