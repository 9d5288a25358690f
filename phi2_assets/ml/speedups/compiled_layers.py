"""Compiled layers: every decoder layer runs through one `torch.compile`d graph while training.

What: a QLoRA step of a 2.7B model launches thousands of small kernels, each behind PEFT's, bitsandbytes' and
autograd's Python. The layers share their code, so Dynamo compiles one graph for all of them (dynamic shapes:
every batch length reuses it), with the LoRA layers inside; the model's head, loss and optimizer stay eager. While
gradients are on, the first layer's input is made to require grad like every other layer's, so it needs no graph
of its own. The layers go back to eager afterwards, for generation and for the next user of the shared model.
When it pays: long GPU runs; the compile takes tens of seconds in each process, so short runs lose.
Cost: the compile; not with activation checkpointing (Inductor fails on checkpointed layers).
Knob: `compile_layers: true` (with `speedups: true`) on the training stage; verified torch and transformers only
(it undoes `nn.Module.compile` through its private `_compiled_call_impl`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from transformers import PreTrainedModel
from transformers.modeling_layers import GradientCheckpointingLayer

from phi2_assets.ml.speedups import guards


def available() -> bool:
    return guards.requires("compiled_layers", torch=guards.TORCH, transformers=guards.TRANSFORMERS)


@contextlib.contextmanager
def applied(model: PreTrainedModel) -> Iterator[None]:
    if not available():
        yield
        return
    layers = [module for module in model.modules() if isinstance(module, GradientCheckpointingLayer)]

    def input_requires_grad(module: torch.nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        if torch.is_grad_enabled():
            output.requires_grad_(True)

    hook = model.get_input_embeddings().register_forward_hook(input_requires_grad)
    for layer in layers:
        layer.compile(dynamic=True)
    try:
        yield
    finally:
        hook.remove()
        for layer in layers:
            layer._compiled_call_impl = None  # what `nn.Module.compile` set: the module calls its eager forward again
