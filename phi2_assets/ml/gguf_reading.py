"""Reading a GGUF file's metadata and tensors quickly: `struct` over a memory map, string arrays skipped.

`gguf.GGUFReader` builds a numpy view for every element of every metadata array, which for Gemma's 262k-token
vocabulary takes most of a minute; the tensors need none of it. Tensors are dequantized by gguf's own numpy
dequantizer, the one transformers' GGUF loading uses.
"""

from __future__ import annotations

import dataclasses
import struct
from math import prod
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, dequantize, quant_shape_to_byte_shape

MAGIC = b"GGUF"
VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
# fixed-size metadata value types (GGUFValueType): struct format by type id; 8 is a string, 9 an array
SCALAR_FORMATS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
STRING, ARRAY = 8, 9


@dataclasses.dataclass(frozen=True)
class TensorEntry:
    name: str
    shape: tuple[int, ...]  # numpy (row-major) order: ggml lists the fastest-moving dimension first
    quant: GGMLQuantizationType
    start: int  # byte offset in the file


@dataclasses.dataclass(frozen=True)
class GgufContents:
    """Metadata (a string array as its length) and the tensor table of a GGUF file."""

    path: Path
    metadata: dict[str, object]
    tensors: tuple[TensorEntry, ...]

    def dequantized(self, entry: TensorEntry) -> np.ndarray:
        """One tensor in fp32."""
        block_size, type_size = GGML_QUANT_SIZES[entry.quant]
        nbytes = prod(entry.shape) // block_size * type_size
        blob = np.memmap(self.path, mode="r", dtype=np.uint8, offset=entry.start, shape=(nbytes,))
        return dequantize(blob.reshape(quant_shape_to_byte_shape(entry.shape, entry.quant)), entry.quant)


def read_gguf(path: Path) -> GgufContents:
    """Parse the header, metadata and tensor table; raises ValueError naming the file for anything else."""
    blob = memoryview(np.memmap(path, mode="r", dtype=np.uint8))  # struct reads it in place; tensor pages stay unread
    if blob[:4] != MAGIC:
        raise ValueError(f"{path} is not a GGUF file (no GGUF magic bytes)")
    version, tensor_count, metadata_count = struct.unpack_from("<IQQ", blob, 4)
    if version not in VERSIONS:
        raise ValueError(f"{path} is GGUF version {version}; readable: {VERSIONS}")
    pos, metadata = 24, {}
    for _ in range(metadata_count):
        key, pos = _string(blob, pos)
        (value_type,) = struct.unpack_from("<I", blob, pos)
        metadata[key], pos = _value(blob, pos + 4, value_type, path)
    table = []
    for _ in range(tensor_count):
        name, pos = _string(blob, pos)
        (dims,) = struct.unpack_from("<I", blob, pos)
        shape = struct.unpack_from(f"<{dims}Q", blob, pos + 4)
        quant, offset = struct.unpack_from("<IQ", blob, pos + 4 + 8 * dims)
        pos += 4 + 8 * dims + 12
        table.append((name, tuple(reversed(shape)), GGMLQuantizationType(quant), offset))
    alignment = int(metadata.get("general.alignment", DEFAULT_ALIGNMENT))
    data_start = (pos + alignment - 1) // alignment * alignment
    tensors = tuple(TensorEntry(name, shape, quant, data_start + offset) for name, shape, quant, offset in table)
    return GgufContents(Path(path), metadata, tensors)


def _string(blob, pos: int) -> tuple[str, int]:
    (length,) = struct.unpack_from("<Q", blob, pos)
    return bytes(blob[pos + 8 : pos + 8 + length]).decode("utf-8"), pos + 8 + length


def _value(blob, pos: int, value_type: int, path: Path) -> tuple[object, int]:
    if value_type in SCALAR_FORMATS:
        fmt = SCALAR_FORMATS[value_type]
        return struct.unpack_from(fmt, blob, pos)[0], pos + struct.calcsize(fmt)
    if value_type == STRING:
        return _string(blob, pos)
    if value_type != ARRAY:
        raise ValueError(f"{path}: metadata value of unknown type {value_type} at byte {pos}")
    element_type, count = struct.unpack_from("<IQ", blob, pos)
    pos += 12
    if element_type in SCALAR_FORMATS:
        fmt = SCALAR_FORMATS[element_type][1]
        return list(struct.unpack_from(f"<{count}{fmt}", blob, pos)), pos + count * struct.calcsize(fmt)
    if element_type != STRING:
        raise ValueError(f"{path}: metadata array of element type {element_type} at byte {pos}")
    for _ in range(count):  # a vocabulary or merge table: only its length is kept
        (length,) = struct.unpack_from("<Q", blob, pos)
        pos += 8 + length
    return count, pos
