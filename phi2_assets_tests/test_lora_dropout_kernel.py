"""Kernel dropout: the adapters' first matmul with the dropout drawn inside, against PyTorch's ops on the same draws.

On CUDA the kernels compile for bf16, the phi2 profile's adapters; without CUDA they run under Triton's interpreter
(where Triton is installed) in fp16, as the interpreter computes no bf16. On CUDA a 4-bit model also trains through
them, as the phi2 profile would.
"""

import dataclasses

import pytest
import torch

from phi2_assets.ml.speedups import lean_lora
from phi2_assets.ml.train import TrainSettings, train_lora
from phi2_assets_tests.conftest import tiny_training_set

pytest.importorskip("triton")  # without CUDA, conftest has chosen Triton's interpreter

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPE = torch.bfloat16 if DEVICE == "cuda" else torch.float16
TOKENS, FEATURES, RANK, P = 200, 256, 16, 0.25


def inputs(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(TOKENS, FEATURES, generator=generator).to(DEVICE, DTYPE)
    a_weight = (torch.randn(RANK, FEATURES, generator=generator) * 0.05).to(DEVICE, DTYPE)
    return x, a_weight


def dropped_as_pytorch_drops(x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """What `nn.Dropout` gives for x with these keep draws: kept values times 1 / (1 - p), in fp32, rounded."""
    return torch.where(keep, x.float() * (1 / (1 - P)), 0.0).to(x.dtype)


def test_the_kernels_compute_pytorchs_ops_on_their_own_keep_bits():
    from phi2_assets.ml.speedups import lora_dropout_kernel

    x, a_weight = inputs()
    seed = torch.tensor([1234], device=DEVICE)
    reduced, bits = lora_dropout_kernel.down(x, a_weight, P, seed)
    keep = lora_dropout_kernel.unpacked_keep(bits)
    assert abs(keep.float().mean().item() - (1 - P)) < 0.01
    # independent draws: two columns of a group of four (one Philox draw) agree as often as chance has them agree
    for column in range(1, 4):
        agree = keep[:, 0::4].eq(keep[:, column::4]).float().mean().item()
        assert abs(agree - (P**2 + (1 - P) ** 2)) < 0.02
    dropped = dropped_as_pytorch_drops(x, keep)
    # one rounding of the fp32 sums, as the matmul's; the sums' order is the kernel's own
    torch.testing.assert_close(reduced, (dropped.float() @ a_weight.float().T).to(DTYPE), rtol=1e-2, atol=1e-2)
    grad = torch.randn(TOKENS, RANK, generator=torch.Generator().manual_seed(1)).to(DEVICE, DTYPE)
    torch.testing.assert_close(lora_dropout_kernel.weight_grad(x, grad, bits, P),
                               grad.float().T @ dropped.float(), rtol=1e-3, atol=1e-3)
    expected = dropped_as_pytorch_drops(grad @ a_weight, keep)  # the matmul rounds, then dropout's backward
    torch.testing.assert_close(lora_dropout_kernel.input_grad(grad, a_weight, bits, P, DTYPE), expected,
                               rtol=1e-2, atol=1e-2)
    again, same_bits = lora_dropout_kernel.down(x, a_weight, P, seed)
    assert torch.equal(same_bits, bits) and torch.equal(again, reduced), "one seed, one set of draws"
    _, other_bits = lora_dropout_kernel.down(x, a_weight, P, torch.tensor([1235], device=DEVICE))
    assert not torch.equal(other_bits, bits)


def test_autograd_through_the_kernels_gives_the_gradients_of_the_draws_it_made():
    """The autograd function's output and both gradients equal PyTorch's ops run on the draws the kernel made (the
    seed it takes from torch's generator, drawn again from the same state)."""
    from phi2_assets.ml.speedups import lora_dropout_kernel

    x, a_weight = inputs(2)
    x.requires_grad_(True)
    a_weight.requires_grad_(True)
    torch.manual_seed(7)
    reduced = lean_lora._KernelDropoutDown.apply(x.reshape(4, TOKENS // 4, FEATURES), a_weight, P)
    upstream = torch.randn(reduced.shape, generator=torch.Generator().manual_seed(3)).to(DEVICE, DTYPE)
    reduced.backward(upstream)
    torch.manual_seed(7)
    seed = torch.randint(2**31 - 1, (1,), device=DEVICE)
    keep = lora_dropout_kernel.unpacked_keep(lora_dropout_kernel.down(x.detach(), a_weight.detach(), P, seed)[1])
    x_ref, a_ref = x.detach().clone().requires_grad_(True), a_weight.detach().clone().requires_grad_(True)
    dropped = torch.where(keep, x_ref * (1 / (1 - P)), torch.zeros_like(x_ref))
    expected = (dropped.float() @ a_ref.float().T).to(DTYPE)
    expected.backward(upstream.reshape(TOKENS, RANK))
    assert reduced.shape == (4, TOKENS // 4, RANK)
    torch.testing.assert_close(reduced.reshape(TOKENS, RANK), expected, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(a_weight.grad, a_ref.grad, rtol=1e-2, atol=1e-2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the kernels take CUDA inputs in training")
def test_a_4bit_model_trains_through_the_kernels_as_through_pytorchs_dropout(tmp_path, monkeypatch):
    """TRL keeps a 4-bit model's adapters in bf16, so every adapter takes the kernels; the losses are those of
    PyTorch's dropout up to the other draws."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from phi2_assets.ml.speedups import lora_dropout_kernel

    model, tokenizer, train, validation = tiny_training_set()
    quantized = AutoModelForCausalLM.from_pretrained(
        model.name_or_path, dtype=torch.bfloat16, device_map={"": "cuda"}, quantization_config=BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16))
    calls = []
    down = lora_dropout_kernel.down
    monkeypatch.setattr(lora_dropout_kernel, "down", lambda *args: calls.append(1) or down(*args))
    settings = TrainSettings(
        lora_r=16, lora_alpha=32, lora_dropout=0.1, learning_rate=1e-3, epochs=1, max_steps=4, per_device_batch_size=4,
        gradient_accumulation_steps=1, optimizer="adamw_torch_fused", lr_scheduler="constant", warmup_ratio=0.0,
        gradient_checkpointing=False, bf16=False, logging_steps=1, save_steps=100, lora_dropout_kernel=True)
    kernels = train_lora(quantized, tokenizer, train, validation, settings, tmp_path / "kernels", tmp_path / "c")
    assert len(calls) == 4 * 6 * len(quantized.model.layers)  # every adapter's forward, every step
    pytorch = train_lora(quantized, tokenizer, train, validation,
                         dataclasses.replace(settings, lora_dropout_kernel=False), tmp_path / "pytorch", tmp_path / "c")
    assert kernels.train_losses == pytest.approx(pytorch.train_losses, rel=2e-2)
    assert kernels.eval_loss == pytest.approx(pytorch.eval_loss, rel=2e-2)
