"""Quick GGUF loading: a GGUF file's model built from its metadata and tensors read with `ml.gguf_reading`.

What: transformers' `from_pretrained(gguf_file=...)` parses the file with `gguf.GGUFReader`, which builds a numpy
view for every element of every metadata array (Gemma's 262k-token vocabulary, three arrays), once per call. This
reads the metadata and tensor table with `struct` over a memory map instead, then renames, adjusts and dequantizes
the tensors with transformers' own GGUF maps (`GGUF_CONFIG_MAPPING`, `TENSOR_PROCESSORS`,
`get_gguf_hf_weights_map`) and gguf's dequantizer, as transformers' loading does: the same config and weights.
When it pays: the one-time conversion of the offline profile's Gemma-3-270M GGUF to safetensors.
Knob: `speedups` of the `base_model` resource (`ModelSpec.speedups`, `models.ensure_gguf_conversion(quick=...)`),
read when the conversion is made; it reads transformers' private GGUF maps, so it runs only on the verified
transformers release, and elsewhere the conversion loads the file through transformers as shipped.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from phi2_assets.ml import gguf_reading
from phi2_assets.ml.speedups import guards

try:
    from transformers.integrations.ggml import GGUF_CONFIG_MAPPING
    from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor, get_gguf_hf_weights_map
except ImportError:  # a release without these maps: `available()` turns the speed-up off
    GGUF_CONFIG_MAPPING = TENSOR_PROCESSORS = TensorProcessor = get_gguf_hf_weights_map = None


def available() -> bool:
    return guards.requires("quick_gguf", transformers=guards.TRANSFORMERS) and GGUF_CONFIG_MAPPING is not None


def load_model(gguf_path: Path) -> PreTrainedModel:
    """The GGUF's causal LM in fp32, with the config and weights transformers' GGUF loading gives."""
    contents = gguf_reading.read_gguf(gguf_path)
    config = gguf_config(contents.metadata, tuple(entry.name for entry in contents.tensors))
    with torch.device("meta"):  # no random initialisation of weights that are overwritten next
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**config), dtype=torch.float32)
    model.load_state_dict(gguf_state_dict(contents, model), strict=True, assign=True)
    return model


def gguf_config(metadata: dict, tensor_names: tuple[str, ...]) -> dict:
    """The config dict transformers' GGUF loading derives from a file's metadata (`load_gguf_checkpoint`), for an
    architecture it keeps the name of (Gemma 3's text model)."""
    architecture = metadata["general.architecture"]
    config: dict = {"tie_word_embeddings": "output.weight" not in tensor_names}
    for key, value in metadata.items():
        prefix, _, name = key.partition(".")
        if prefix in ("general", architecture, "tokenizer"):
            renamed = GGUF_CONFIG_MAPPING.get(prefix, {}).get(name)
            if renamed not in (None, -1):
                config[renamed] = value
    config.setdefault("vocab_size", metadata["tokenizer.ggml.tokens"])  # the reader gives a string array's length
    if config["model_type"] == "gemma3":
        config["model_type"] = "gemma3_text"  # the file holds the text backbone only
    return config


def gguf_state_dict(contents: gguf_reading.GgufContents, model: PreTrainedModel) -> dict[str, torch.Tensor]:
    """Every tensor of the GGUF in fp32, named and adjusted the way transformers' GGUF loading does (its
    tensor-name map and per-architecture processor: Gemma's norms are stored plus 1)."""
    architecture = contents.metadata["general.architecture"]
    processor = TENSOR_PROCESSORS.get(architecture, TensorProcessor)(config=model.config.to_dict())
    names = get_gguf_hf_weights_map(model, processor)
    weights = {}
    for entry in contents.tensors:
        result = processor.process(weights=contents.dequantized(entry), name=entry.name, tensor_key_mapping=names,
                                   parsed_parameters={})
        if result.name in names:
            weights[names[result.name]] = torch.from_numpy(np.array(result.weights, dtype=np.float32))
    if model.config.tie_word_embeddings:
        weights.setdefault("lm_head.weight", weights["model.embed_tokens.weight"])
    return weights
