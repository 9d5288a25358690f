"""Lean steps: less host work per training step, where the Trainer redoes every step what a LoRA model need not.

What: `LeanStepSFTTrainer` counts the parameters for the FLOP figure once, clips the LoRA gradients from a list taken
once, and keeps the input-token count and TRL's per-batch entropy, token accuracy and token count on the device
until a log line or checkpoint reads them (each `.item()` made the host wait for the GPU's queued work, in every
training step and every evaluation batch); `cached_module_walks` serves `model.train()` and `model.zero_grad()`
from lists taken once.
When it pays: on a GPU, where a QLoRA step of Phi-2 is a few hundred ms of Python around the GPU's work and every
walk over the model's ~2,300 modules shows in tokens/s. Steps, losses and counted tokens are the stock trainer's.
Knob: `speedups` of the training stage; it overrides Trainer's private `_clip_grad_norm`,
`_track_num_input_tokens` and `_save_checkpoint`, and SFTTrainer's `compute_loss` for its plain next-token loss (its
`_metrics` and `_total_train_tokens`), so it runs only on the verified transformers and TRL releases.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from transformers import Trainer
from trl import SFTTrainer

from phi2_assets.ml.speedups import guards

_OVERRIDDEN = ("_clip_grad_norm", "_track_num_input_tokens", "_save_checkpoint", "_has_mixed_mesh_grads")
_METRICS = ("entropy", "mean_token_accuracy")  # SFTTrainer's per-batch metrics, in the order it records them
# (model, inputs) -> over the labelled positions: summed log-probability, count, summed entropy, top-1 count
LabelledSums = Callable[[torch.nn.Module, dict], tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]


def available() -> bool:
    """The verified releases, with every Trainer method the lean trainer overrides or calls."""
    return guards.requires("lean_steps", transformers=guards.TRANSFORMERS, trl=guards.TRL) and all(
        hasattr(Trainer, name) for name in _OVERRIDDEN) and hasattr(SFTTrainer, "compute_loss")


class LeanStepSFTTrainer(SFTTrainer):
    """TRL's SFTTrainer, computing the same steps with less host work between them.

    - Trainer adds 6 x tokens x parameters to `total_flos` every step and counts the parameters afresh each time (a
      walk over every module); they do not change during training, so they are counted once.
    - Gradient clipping walks `model.parameters()` every step for the LoRA weights, the only ones with gradients; it
      gets those in a list taken once.
    - Trainer counts the step's input tokens with `.item()`, which makes the host wait, before the next step's
      launches, for the GPU to finish the last step; the count stays on the device until a log line or a checkpoint
      reads it.
    - SFTTrainer's loss reads its entropy, token accuracy and (training) token count with three more `.item()`s per
      batch, training and evaluation alike; `compute_loss` computes the same loss and keeps those figures on the
      device until a log line reads them, which then sees the values TRL would have recorded.
    """

    _parameters_without_embeddings: int | None = None
    _trainable_parameters: list[torch.nn.Parameter] | None = None
    _pending_input_tokens: torch.Tensor | None = None
    _pending_train_tokens: torch.Tensor | None = None
    _pending_metrics: dict[str, list[torch.Tensor]] | None = None

    def floating_point_ops(self, inputs: dict) -> int:
        main_input = getattr(self.model, "main_input_name", "input_ids")
        if main_input not in inputs or not hasattr(self.model, "num_parameters"):
            return 0
        if self._parameters_without_embeddings is None:
            self._parameters_without_embeddings = self.model.num_parameters(exclude_embeddings=True)
        return 6 * inputs[main_input].numel() * self._parameters_without_embeddings

    def _clip_grad_norm(self, model: torch.nn.Module):
        if self.args.fp16 or self._has_mixed_mesh_grads(model):  # Trainer's special cases keep its own code
            return super()._clip_grad_norm(model)
        if self._trainable_parameters is None:
            self._trainable_parameters = [p for p in model.parameters() if p.requires_grad]
        return self.accelerator.clip_grad_norm_(self._trainable_parameters, self.args.max_grad_norm)

    def _track_num_input_tokens(self, inputs: dict) -> None:
        if self.args.include_num_input_tokens_seen != "non_padding" or "attention_mask" not in inputs:
            return super()._track_num_input_tokens(inputs)
        tokens = self.accelerator.gather(inputs["attention_mask"].sum()).sum()
        pending = self._pending_input_tokens
        self._pending_input_tokens = tokens if pending is None else pending + tokens

    def _count_pending_input_tokens(self) -> None:
        if self._pending_input_tokens is not None:
            self.state.num_input_tokens_seen += int(self._pending_input_tokens)
            self._pending_input_tokens = None

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if return_outputs or not self.computes_plain_loss(inputs):
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        loss, figures, tokens = self.loss_and_figures(model, inputs, num_items_in_batch)
        self.defer_figures(figures, tokens)
        return loss

    def computes_plain_loss(self, inputs: dict) -> bool:
        """Whether `loss_and_figures` computes this batch's loss as SFTTrainer's `compute_loss` would: its default
        next-token loss (no custom loss function, label smoothing, DFT loss, MoE auxiliary loss or sequence
        parallelism) on a padded batch (padding-free batches keep TRL's own `compute_loss`)."""
        parallelism = getattr(self.accelerator, "parallelism_config", None)
        return ("attention_mask" in inputs and self.compute_loss_func is None and self.label_smoother is None
                and self.args.loss_type == "nll" and not self.aux_loss_enabled
                and not (parallelism is not None and parallelism.sp_enabled))

    def loss_and_figures(self, model, inputs: dict, num_items_in_batch,
                         labelled_sums: LabelledSums | None = None) -> tuple[torch.Tensor, torch.Tensor,
                                                                             torch.Tensor | None]:
        """SFTTrainer's loss and, on the device, the batch's entropy and token accuracy (0 for a batch without
        labels) and, in training, its token count: every figure its `compute_loss` reads with `.item()`. The sums
        over the labelled positions come from `labelled_sums` (TRL's fused LM head by default)."""
        log_prob_sum, num_labelled, entropy_sum, num_correct = (labelled_sums or fused_head_sums)(model, inputs)
        num_tokens = num_labelled if num_items_in_batch is None else num_items_in_batch
        loss = -log_prob_sum / torch.as_tensor(num_tokens).clamp(min=1)
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * (self.accelerator.num_processes // self.get_tp_size())
        gather = self.accelerator.gather_for_metrics
        num_valid = gather(num_labelled).sum()
        entropy_sum = gather(entropy_sum).sum()
        num_correct = gather(num_correct).sum()
        labelled = num_valid > 0
        figures = torch.stack([torch.where(labelled, entropy_sum / num_valid, 0.0).float(),
                               torch.where(labelled, num_correct / num_valid, 0.0).float()])
        tokens = gather(inputs["attention_mask"].sum()).sum() // self._tp_size if self.model.training else None
        return loss, figures, tokens

    def defer_figures(self, figures: torch.Tensor, tokens: torch.Tensor | None) -> None:
        """Keeps a batch's figures from `loss_and_figures` until a log line reads them."""
        if self._pending_metrics is None:
            self._pending_metrics = {"train": [], "eval": []}
        self._pending_metrics["train" if tokens is not None else "eval"].append(figures)
        if tokens is not None:
            pending = self._pending_train_tokens
            self._pending_train_tokens = tokens if pending is None else pending + tokens

    def _record_pending_metrics(self) -> None:
        """The deferred figures into SFTTrainer's `_metrics` and `_total_train_tokens`, as its `compute_loss`
        records them."""
        if self._pending_train_tokens is not None:
            self._total_train_tokens += int(self._pending_train_tokens)
            self._pending_train_tokens = None
        for mode, pending in (self._pending_metrics or {}).items():
            if not pending:
                continue
            for batch in torch.stack(pending).tolist():
                for name, value in zip(_METRICS, batch, strict=True):
                    self._metrics[mode][name].append(value)
            self._metrics[mode]["num_tokens"] = [self._total_train_tokens]
            pending.clear()

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        self._count_pending_input_tokens()
        self._record_pending_metrics()
        super().log(logs, start_time)

    def _save_checkpoint(self, model: torch.nn.Module, trial) -> None:
        self._count_pending_input_tokens()
        super()._save_checkpoint(model, trial)


def fused_head_sums(model, inputs: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Over a batch's labelled positions, as TRL's fused LM head scores them: the summed log-probability of the
    labels, their count, the summed entropy and the count of labels that were the most likely token."""
    inputs["use_cache"] = False
    outputs = model(**inputs, fused_lm_head=True)  # per-token fields are zero where there is no label
    return (outputs.log_probs.sum(), outputs.label_mask.sum(), outputs.entropy.detach().sum(),
            outputs.is_top1.sum())


@contextlib.contextmanager
def cached_module_walks(model: torch.nn.Module) -> Iterator[None]:
    """While inside, the two walks over every module that the Trainer makes each step read lists taken once:
    `model.train()` (before every step; it sets the flag on each module through `nn.Module.__setattr__`)
    only switches when some module is in the other mode, and `model.zero_grad()` (after every step) clears the
    gradients of the parameters that get any. The model's own methods come back afterwards."""
    modules = list(model.modules())
    trainable = [p for p in model.parameters() if p.requires_grad]

    def train(mode: bool = True) -> torch.nn.Module:
        if any(module.training != mode for module in modules):
            type(model).train(model, mode)
        return model

    def zero_grad(set_to_none: bool = True) -> None:
        if not set_to_none:
            type(model).zero_grad(model, set_to_none=False)
            return
        for parameter in trainable:
            parameter.grad = None

    model.train = train  # `eval()` goes through it too: nn.Module.eval calls self.train(False)
    model.zero_grad = zero_grad
    try:
        yield
    finally:
        del model.train, model.zero_grad
