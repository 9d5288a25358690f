"""Graphed steps: each training step's forward and backward replayed as one CUDA graph per batch shape.

What: with the other training speed-ups, a QLoRA step of Phi-2 is some 5,000 kernels, and launching them from
Python (modules, PEFT, autograd) takes longer than the GPU takes to run them. `GraphedStepSFTTrainer` captures the
forward pass, TRL's loss and the backward pass into the LoRA gradients of the first step of each batch shape into a
CUDA graph and replays it for every later batch of that shape: one launch instead of thousands. The batch is copied
into the graph's input tensors before a replay, and the gradients it wrote are handed to the eager optimizer step.
The first step of the run is eager, on the capture stream, so that lazy initialisation (cuBLAS workspaces, Triton
compiles) happens outside every capture. Gradient clipping, the optimizer step, logging and evaluation stay eager.
When it pays: CUDA training whose host sets the pace, with few batch shapes (padding to a multiple of 64).
Cost: one memory pool shared by every shape's graph, as large as the largest step's activations, kept beside the
eager allocator's memory for the length of training; a capture per shape. TRL's LM head gathers a batch's labelled
positions, as many as the GPU counts, which no capture allows; inside a graph they are gathered into a fixed number
of rows (the batch's rows times the most labels a training row has), the rest masked out, so the head scores more
rows than it needs. Dropout draws from the same generator, by offsets the graph advances at each replay.
Knob: `cuda_graph` of the training stage, with `speedups`. Graphs need one process, one micro-batch per optimizer
step, no autocast, no activation checkpointing, eager decoder layers, TRL's plain next-token loss, training rows
with labels and an LM head without a logit scale; other runs and batches take the eager step. A capture that fails
turns graphs off for the run with one warning.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import gc
import logging
import time
from collections.abc import Callable, Iterator

import numpy as np
import torch

from phi2_assets.ml.speedups import guards, lean_steps

log = logging.getLogger(__name__)

# the config fields by which TRL's fused LM head scales the logits
_LOGIT_SCALES = ("logit_scale", "output_multiplier", "lm_head_multiplier", "logits_scaling")
# A step function computes a batch's loss and backward pass: (inputs, items in the batch) -> (loss, other outputs)
StepFunction = Callable[[dict, torch.Tensor | None], tuple[torch.Tensor, tuple[torch.Tensor | None, ...]]]


def available() -> bool:
    return torch.cuda.is_available() and guards.requires(
        "graphed_steps", torch=guards.TORCH, transformers=guards.TRANSFORMERS, trl=guards.TRL)


def gathered_head_sums(model, inputs: dict, rows: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                                   torch.Tensor]:
    """What TRL's fused LM head sums over a batch's labelled positions (`lean_steps.fused_head_sums`), with those
    positions gathered into `rows` rows, at least as many as the batch labels, the rest masked out. TRL gathers as
    many rows as the batch labels, a count only the GPU knows, which no capture allows."""
    from trl.kernels import ChunkedLogProbFunction
    from trl.trainer.utils import _CHUNKED_LOGPROB_CHUNK_SIZE

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    backbone_inputs = {name: value for name, value in inputs.items() if name not in ("labels", "use_cache")}
    hidden = base.base_model(**backbone_inputs, use_cache=False).last_hidden_state
    labels = inputs["labels"][:, 1:]  # position t predicts the label at t + 1
    width = labels.shape[1]
    labelled = labels != -100
    index = torch.nonzero_static(labelled.reshape(-1), size=rows, fill_value=0).squeeze(1)
    kept = torch.arange(rows, device=index.device) < labelled.sum()
    hidden_rows = hidden.reshape(-1, hidden.shape[-1]).index_select(0, index // width * (width + 1) + index % width)
    targets = labels.reshape(-1).index_select(0, index).clamp(min=0)
    head = base.get_output_embeddings()
    softcap = getattr(base.config.get_text_config(), "final_logit_softcapping", None)
    log_probs, entropy, _, _, is_top1 = ChunkedLogProbFunction.apply(
        hidden_rows, head.weight, head.bias, targets, 1.0, _CHUNKED_LOGPROB_CHUNK_SIZE, softcap, 1.0,
        ("log_probs", "entropy", "is_top1"))
    zero = log_probs.new_zeros(())
    return (torch.where(kept, log_probs, zero).sum(), labelled.sum(), torch.where(kept, entropy.detach(), zero).sum(),
            (is_top1 & kept).sum())


def most_labels_per_row(dataset) -> int:
    """The most next-token labels any row of a tokenized dataset carries (its labels after the first)."""
    return max((int(np.count_nonzero(np.asarray(labels[1:]) != -100)) for labels in dataset["labels"]), default=0)


@contextlib.contextmanager
def garbage_kept() -> Iterator[None]:
    """While inside, Python's garbage collector does not run: a collection during a capture could free another
    graph or unload a Triton kernel's module, which no capture allows."""
    collecting = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if collecting:
            gc.enable()


class CaptureFailed(RuntimeError):
    """A step could not be captured: an operation inside reads the GPU back, or the capture ran out of memory."""


@dataclasses.dataclass
class CapturedStep:
    """One batch shape's graph: the tensors it reads and writes, and the gradients it leaves."""

    graph: torch.cuda.CUDAGraph
    inputs: dict
    num_items: torch.Tensor | None
    loss: torch.Tensor
    outputs: tuple[torch.Tensor | None, ...]
    gradients: list[torch.Tensor | None]


class StepGraphs:
    """The graphs of one training run, one per batch shape, in one shared memory pool."""

    def __init__(self, parameters: list[torch.nn.Parameter]):
        self.parameters = parameters
        self.steps: dict[tuple, CapturedStep] = {}
        self.stream: torch.cuda.Stream | None = None
        self.pool = None
        self.replays = 0
        self.capture_seconds = 0.0

    def run(self, inputs: dict, num_items: torch.Tensor | None,
            step: StepFunction) -> tuple[torch.Tensor, tuple[torch.Tensor | None, ...]]:
        """The step on this batch: eager on the run's first batch, else the replay of its shape's graph (captured
        on the shape's first batch). The parameters' gradients are the step's afterwards."""
        if self.stream is None:
            return self._warm_up(inputs, num_items, step)
        key = _shape_key(inputs, num_items)
        captured = self.steps.get(key)
        if captured is None:
            started = time.perf_counter()
            captured = self.steps[key] = self._capture(inputs, num_items, step)
            self.capture_seconds += time.perf_counter() - started
        for name, tensor in captured.inputs.items():
            if isinstance(tensor, torch.Tensor):
                tensor.copy_(inputs[name], non_blocking=True)
        if captured.num_items is not None:
            captured.num_items.copy_(num_items, non_blocking=True)
        captured.graph.replay()
        self.replays += 1
        for parameter, gradient in zip(self.parameters, captured.gradients, strict=True):
            parameter.grad = gradient
        return captured.loss, captured.outputs

    def _warm_up(self, inputs: dict, num_items: torch.Tensor | None,
                 step: StepFunction) -> tuple[torch.Tensor, tuple[torch.Tensor | None, ...]]:
        """The first step, eager on the stream later captures use, so that everything initialised on first use
        is initialised outside a capture."""
        self.stream = torch.cuda.Stream()
        self.stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.stream):
            result = step(inputs, num_items)
        torch.cuda.current_stream().wait_stream(self.stream)
        return result

    def _capture(self, inputs: dict, num_items: torch.Tensor | None, step: StepFunction) -> CapturedStep:
        """Records `step` on copies of this batch's tensors. Gradients are unset first, so that the backward pass
        allocates them in the pool and every replay rewrites the same tensors."""
        static_inputs = {name: value.clone() if isinstance(value, torch.Tensor) else value
                         for name, value in inputs.items()}
        static_items = None if num_items is None else num_items.clone()
        for parameter in self.parameters:
            parameter.grad = None
        self.pool = self.pool or torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        # `torch.cuda.graph` waits for the device and hands the eager steps' cached blocks back for the pool;
        # thread_local: the data loader's pin-memory thread may allocate pinned memory meanwhile
        try:
            with garbage_kept(), torch.cuda.graph(
                    graph, pool=self.pool, stream=self.stream, capture_error_mode="thread_local"):
                loss, outputs = step(static_inputs, static_items)
        except RuntimeError as error:
            raise CaptureFailed(str(error).splitlines()[0] if str(error) else type(error).__name__) from None
        gradients = [parameter.grad for parameter in self.parameters]
        return CapturedStep(graph, static_inputs, static_items, loss, outputs, gradients)


def _shape_key(inputs: dict, num_items: torch.Tensor | None) -> tuple:
    """What a graph is specific to: each input tensor's shape and dtype, and the other inputs' values."""
    parts = [(name, tuple(value.shape), value.dtype) if isinstance(value, torch.Tensor) else (name, value)
             for name, value in sorted(inputs.items())]
    return tuple(parts), num_items is None


class GraphedStepSFTTrainer(lean_steps.LeanStepSFTTrainer):
    """The lean-step trainer replaying each batch shape's forward and backward pass as a CUDA graph, where the run
    allows graphs (`graphs_allowed`); every other step is the lean trainer's eager step."""

    _step_graphs: StepGraphs | None = None
    _graphs_off: bool | None = None  # decided at the first step: the run's settings do not change
    _most_labels: int | None = None

    def train(self, *args, **kwargs):
        try:
            return super().train(*args, **kwargs)
        finally:
            self._release_graphs()

    def _release_graphs(self) -> None:
        """Says how many steps the graphs served, then frees them and their pool for what runs after training."""
        graphs, self._step_graphs = self._step_graphs, None
        if graphs is None:
            return
        log.info("training replayed %d steps from %d CUDA graphs, one per batch shape, captured in %.1f s",
                 graphs.replays, len(graphs.steps), graphs.capture_seconds)
        for parameter in graphs.parameters:
            parameter.grad = None
        graphs.steps.clear()
        torch.cuda.empty_cache()

    def training_step(self, model, inputs, num_items_in_batch=None):
        if self._graphs_off is None:
            self._graphs_off = not self._graphs_allowed(model)
        if self._graphs_off or not self.computes_plain_loss(inputs):
            return super().training_step(model, inputs, num_items_in_batch)
        model.train()
        if callable(getattr(self.optimizer, "train", None)):  # as Trainer's step does (schedule-free optimizers)
            self.optimizer.train()
        inputs = self._prepare_inputs(inputs)
        if isinstance(num_items_in_batch, int):
            num_items_in_batch = torch.tensor(num_items_in_batch, device=self.args.device)
        if self._step_graphs is None:
            self._step_graphs = StepGraphs([p for p in model.parameters() if p.requires_grad])
        try:
            loss, (figures, tokens) = self._step_graphs.run(
                inputs, num_items_in_batch, lambda batch, items: self._forward_backward(model, batch, items))
        except CaptureFailed as error:  # the run goes on eager
            log.warning("speed-up graphed_steps is off for this run: capturing a step failed: %s", error)
            self._graphs_off = True
        if self._graphs_off:  # outside the handler, whose traceback holds the failed step's tensors
            self._step_graphs = None
            model.zero_grad()
            return super().training_step(model, inputs, num_items_in_batch)
        self.defer_figures(figures.clone(), tokens.clone())  # the next replay rewrites the graph's outputs
        return loss.detach().clone()

    def _forward_backward(self, model, inputs: dict, num_items: torch.Tensor | None):
        """The step a graph records: the loss, with the LM head on the batch's labelled positions gathered into as
        many rows as its rows times the most labels a training row has, and the backward pass."""
        if self._most_labels is None:
            self._most_labels = most_labels_per_row(self.train_dataset)
        batch_rows, width = inputs["labels"].shape
        rows = batch_rows * min(self._most_labels, width - 1)
        with self.compute_loss_context_manager():
            loss, figures, tokens = self.loss_and_figures(
                model, inputs, num_items, functools.partial(gathered_head_sums, rows=rows))
        self.accelerator.backward(loss)
        return loss, (figures, tokens)

    def _graphs_allowed(self, model) -> bool:
        """One process on CUDA, one micro-batch per optimizer step, no autocast, no activation checkpointing,
        training rows with their labels, and an LM head without a logit scale (the gathered head applies none)."""
        args = self.args
        config = model.config.get_text_config()
        return (args.gradient_accumulation_steps == 1 and self.accelerator.num_processes == 1 and args.n_gpu <= 1
                and not (args.bf16 or args.fp16 or args.gradient_checkpointing) and model.device.type == "cuda"
                and not self.is_deepspeed_enabled and not self.is_fsdp_enabled
                and "labels" in (getattr(self.train_dataset, "column_names", None) or ())
                and all(getattr(config, name, None) is None for name in _LOGIT_SCALES))
