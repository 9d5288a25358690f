"""Speed-ups: every technique that patches, subclasses or reaches into a library, one module each, each applied
for the length of a stage by its `applied(...)` context.

Each module says what it does, when it pays and what its knob is; docs/PERFORMANCE.md has the measured gains.
A stage's `speedups: false` leaves all of them out and runs transformers, TRL and PEFT as shipped (`SFTTrainer`,
`model.generate`, no patched classes); each technique also turns itself off, with one warning, outside the library
versions it was verified against (`guards`).

| module                    | stage      | what                                                          |
|---------------------------|------------|---------------------------------------------------------------|
| `tanh_gelu`               | both       | Phi's eight-op tanh GELU as one fused kernel                  |
| `fused_rotary`            | both       | Phi's partial rotary embedding in one Triton kernel (CUDA)    |
| `fused_qkv`               | generation | query, key and value projections as one matmul (CUDA)         |
| `gelu_epilogue`           | generation | first MLP matmul and its tanh GELU in one cuBLASLt call       |
| `lean_steps`              | training   | less host work and no GPU waits between Trainer steps         |
| `lean_lora`               | training   | PEFT's LoRA forward as plain tensor ops, no per-call Python   |
| `lora_dropout_kernel`     | training   | LoRA dropout drawn inside the adapters' first matmul (CUDA)   |
| `decoded_nf4`             | training   | frozen 4-bit weights decoded to bf16 once, not every pass     |
| `sorted_evaluation`       | training   | held-out rows evaluated in batches sorted by length           |
| `labelled_positions_cpu`  | training   | TRL's LM head on labelled positions only, on CPU too          |
| `kept_logits_cpu`         | training   | TRL's LM head keeps its logits for the backward pass, on CPU  |
| `right_padded_sdpa`       | training   | causal flash attention without the padding mask               |
| `compiled_layers`         | training   | decoder layers as one torch.compile graph (`compile_layers`)  |
| `graphed_steps`           | training   | a step's forward and backward as one CUDA graph per shape     |
| `static_decoding`         | generation | static KV cache, chunked prefill, CUDA-graphed greedy steps   |
| `filled_columns`          | generation | decoding attends over each row's filled cache columns (CUDA)  |
| `decode_attention_kernel` | generation | the split-KV Triton kernel behind `filled_columns`            |
| `right_aligning_kernel`   | generation | the Triton kernel writing prefill chunks into the cache       |
| `kernels_ahead`           | generation | Triton kernels compiled during the model's load and prefill   |
| `shrinking_batch`         | generation | greedy steps on the dynamic cache for unstopped rows only     |
| `batch_planning`          | generation | cost-model batch split within free memory (`batch_size: 0`)   |
| `quick_gguf`              | model      | the GGUF conversion read by struct, not by gguf's reader      |
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from transformers import PreTrainedModel
from trl import SFTTrainer

from phi2_assets.ml.speedups import (
    compiled_layers,
    decoded_nf4,
    fused_qkv,
    fused_rotary,
    gelu_epilogue,
    graphed_steps,
    kept_logits_cpu,
    kernels_ahead,
    labelled_positions_cpu,
    lean_lora,
    lean_steps,
    right_padded_sdpa,
    sorted_evaluation,
    tanh_gelu,
)


def trainer_class(enabled: bool, cuda_graph: bool = False) -> type[SFTTrainer]:
    """The trainer a training stage runs: the lean-step subclass (replaying CUDA graphs where `cuda_graph` asks and
    the machine allows) evaluating in sorted batches, or TRL's own."""
    if not enabled:
        return SFTTrainer
    trainer = SFTTrainer
    if lean_steps.available():
        graphed = cuda_graph and graphed_steps.available()
        trainer = graphed_steps.GraphedStepSFTTrainer if graphed else lean_steps.LeanStepSFTTrainer
    return sorted_evaluation.with_sorted_evaluation(trainer) if sorted_evaluation.available() else trainer


@contextlib.contextmanager
def for_training(base: PreTrainedModel, peft_model: PreTrainedModel, enabled: bool, compile_layers: bool,
                 keeps_activations: bool, kernel_dropout: bool = False) -> Iterator[None]:
    """While inside, training of `peft_model` (LoRA on `base`) runs with every training speed-up `enabled` asks for
    (`keeps_activations`: the recipe does not checkpoint activations, so it has memory to spare; `kernel_dropout`:
    the LoRA dropout drawn in kernels); the shared base model comes back as it was."""
    with contextlib.ExitStack() as stack:
        if enabled:
            stack.enter_context(tanh_gelu.applied(base))
            stack.enter_context(fused_rotary.applied(base))
            stack.enter_context(labelled_positions_cpu.applied())
            stack.enter_context(kept_logits_cpu.applied())
            stack.enter_context(right_padded_sdpa.applied(base))
            stack.enter_context(decoded_nf4.applied(base, keeps_activations))
            stack.enter_context(lean_lora.applied(peft_model, kernel_dropout))
            if compile_layers:
                stack.enter_context(compiled_layers.applied(base))
            if lean_steps.available():
                stack.enter_context(lean_steps.cached_module_walks(peft_model))  # after the swaps: it lists modules
        yield


@contextlib.contextmanager
def for_generation(model: PreTrainedModel, enabled: bool) -> Iterator[None]:
    """While inside, generation with `model` runs with the module-level speed-ups (`static_decoding`,
    `shrinking_batch` and `batch_planning` are chosen per call by `generate`), once the prefill's kernels compiling
    ahead have compiled (static decoding waits for its own before its first step)."""
    with contextlib.ExitStack() as stack:
        if enabled:
            kernels_ahead.wait(*kernels_ahead.PREFILL_KERNELS)
            stack.enter_context(tanh_gelu.applied(model))
            stack.enter_context(fused_rotary.applied(model))
            stack.enter_context(fused_qkv.applied(model))  # after fused_rotary: it uses that attention's forward
            stack.enter_context(gelu_epilogue.applied(model))
        yield
