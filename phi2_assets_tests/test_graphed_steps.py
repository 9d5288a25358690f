"""Graphed steps: a training step captured as a CUDA graph computes the eager step's loss and gradients.

A capture records kernels without running them, so nothing inside may read a GPU value back on the host. On the
CPU that is checked op by op: the step the graph records runs under a dispatch mode that notes every operation
whose result the host would have to wait for. On CUDA the graphed run trains what the eager run trains.
"""

import copy
import dataclasses
import logging

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch.utils._python_dispatch import TorchDispatchMode
from trl import SFTConfig

from phi2_assets.ml import speedups
from phi2_assets.ml.speedups.graphed_steps import GraphedStepSFTTrainer, most_labels_per_row
from phi2_assets.ml.train import TrainSettings, train_lora
from phi2_assets_tests.conftest import tiny_training_set

aten = torch.ops.aten
# operations whose output the host must read before it can go on: a capture fails on each of them
HOST_READS = {aten._local_scalar_dense.default, aten.is_nonzero.default, aten.equal.default, aten.nonzero.default,
              aten.masked_select.default, aten._unique2.default, aten.unique_consecutive.default,
              aten.repeat_interleave.Tensor}
INDEXING = {aten.index.Tensor, aten.index_put.default, aten.index_put_.default, aten._index_put_impl_.default}


class HostReads(TorchDispatchMode):
    """Notes every operation that reads a tensor's values on the host, and every operation's name."""

    def __init__(self):
        super().__init__()
        self.reads: list[str] = []
        self.seen: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.seen.add(func.__name__)
        indices = args[1] if func in INDEXING and len(args) > 1 else ()
        if func in HOST_READS or any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices):
            self.reads.append(func.__name__)
        return func(*args, **kwargs)


@pytest.fixture(scope="module")
def step():
    """(trainer, peft model, batch, items in the batch, base model): the graphed trainer on the tiny Phi with
    LoRA on every projection, dropout on its input as in the phi2 profile, and its first training batch."""
    model, tokenizer, train, validation = tiny_training_set()
    base = copy.deepcopy(model)
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.05, target_modules=[
        "q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2"], task_type="CAUSAL_LM"))
    for name, parameter in peft_model.named_parameters():  # B starts at zero; any B makes the adapters count
        if "lora_B" in name:
            torch.nn.init.normal_(parameter, std=0.02)
    args = SFTConfig(output_dir="unused", per_device_train_batch_size=4, max_length=None, report_to="none",
                     use_cpu=True, disable_tqdm=True, include_num_input_tokens_seen="non_padding")
    columns = ["input_ids", "labels"]
    trainer = GraphedStepSFTTrainer(model=peft_model, args=args, train_dataset=train.select_columns(columns),
                                    processing_class=tokenizer)
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    items = batch["labels"][:, 1:].ne(-100).sum()
    return trainer, peft_model, batch, items, base


def eager_loss_and_gradients(trainer, peft_model, batch, items) -> tuple[torch.Tensor, list[torch.Tensor]]:
    peft_model.zero_grad()
    torch.manual_seed(0)  # the dropout masks the captured step draws below
    loss = trainer.compute_loss(peft_model, dict(batch), num_items_in_batch=items)
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in peft_model.parameters() if p.requires_grad]


def test_the_captured_step_reads_nothing_back_and_computes_the_eager_loss_and_gradients(step):
    trainer, peft_model, batch, items, base = step
    with speedups.for_training(base, peft_model, True, False, keeps_activations=True):
        peft_model.train()
        eager = eager_loss_and_gradients(trainer, peft_model, batch, items)
        peft_model.zero_grad()
        torch.manual_seed(0)
        with HostReads() as reads:
            loss, (figures, tokens) = trainer._forward_backward(peft_model, dict(batch), items)
        gradients = [p.grad for p in peft_model.parameters() if p.requires_grad]
    assert reads.reads == []
    assert "gelu_backward.default" in reads.seen, "the mode saw the backward pass"
    assert {"bernoulli_.float", "native_dropout.default"} & reads.seen, "the mode saw dropout's draws"
    # the head's rows: more than the batch labels (some masked out), fewer than its positions
    rows, width = batch["labels"].shape
    head_rows = rows * most_labels_per_row(trainer.train_dataset)
    assert batch["labels"][:, 1:].ne(-100).sum() < head_rows < rows * (width - 1)
    assert loss.detach() == pytest.approx(eager[0].item(), rel=1e-5)
    assert all(torch.allclose(g, e, rtol=1e-4, atol=1e-7) for g, e in zip(gradients, eager[1], strict=True))
    assert tokens == batch["attention_mask"].sum() and 0 <= figures[1] <= 1


def test_trls_gather_of_the_labelled_positions_reads_their_count_back(step):
    """The check above has teeth: TRL's LM head gathering the labelled positions (on CPU with the speed-ups, as on
    CUDA) is an operation the host must wait for."""
    trainer, peft_model, batch, items, base = step
    with speedups.for_training(base, peft_model, True, False, keeps_activations=True), HostReads() as reads:
        trainer.loss_and_figures(peft_model, dict(batch), items)
    assert "index.Tensor" in reads.reads


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
def test_graphed_steps_train_what_eager_steps_train_on_cuda(tmp_path, caplog):
    """Batches of three shapes over 12 steps: the first eager, a capture for each shape, the rest replays. Without
    dropout the losses are the eager run's (inside a graph the LM head scores every position, so to rounding)."""
    model, tokenizer, train, validation = tiny_training_set(train_rows=48)
    model = model.cuda()
    # rows of 128, 112 and 96 tokens: the prompt's first tokens dropped, the summary kept whole
    train = train.select_columns(["input_ids", "labels"]).map(
        lambda row, index: {key: row[key][16 * (index % 3):] for key in ("input_ids", "labels")}, with_indices=True)
    settings = TrainSettings(
        lora_r=4, lora_alpha=8, lora_dropout=0.0, learning_rate=1e-3, epochs=4, per_device_batch_size=16,
        gradient_accumulation_steps=1, optimizer="adamw_torch_fused", lr_scheduler="constant", warmup_ratio=0.0,
        gradient_checkpointing=False, group_by_length=True, pad_to_multiple_of=16, bf16=False, logging_steps=1,
        save_steps=100, cuda_graph=True)
    with caplog.at_level(logging.INFO, logger="phi2_assets.ml.speedups.graphed_steps"):
        graphed = train_lora(model, tokenizer, train, validation, settings, tmp_path / "graphed", tmp_path / "c")
    eager = train_lora(model, tokenizer, train, validation, dataclasses.replace(settings, cuda_graph=False),
                       tmp_path / "eager", tmp_path / "c")
    assert "graphed_steps is off" not in caplog.text
    assert "replayed" in caplog.text and "from 0 CUDA graphs" not in caplog.text
    assert graphed.train_losses == pytest.approx(eager.train_losses, rel=2e-3)
    assert graphed.eval_loss == pytest.approx(eager.eval_loss, rel=2e-3)
    assert graphed.tokens_seen == eager.tokens_seen
