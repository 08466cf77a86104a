"""The GGUF container, read: header, metadata key/values and tensor descriptions, with each tensor's bytes as a
numpy view of the memory-mapped file. `lmforge.model.gguf` builds the model from it.

    file = GGUFFile.open("model.gguf")
    file.metadata["general.architecture"], [t.name for t in file.tensors]

The layout is llama.cpp's (ggml/docs/gguf.md, version 2 and 3): magic "GGUF", version, tensor and key counts, the
key/values, the tensor infos, then the data aligned to `general.alignment` (32 by default). The `gguf` package
gives the type tables and the dequantizers; its own reader keeps a numpy object per array item, which for a
tokenizer's 49k tokens and 49k merges costs ~160 MB and ~2 s — more than the weights' slack a load may use — so
the few dozen lines of parsing are done here.
"""

from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass
from typing import Any

import gguf
import numpy as np

V = gguf.GGUFValueType
SCALARS = {V.UINT8: "B", V.INT8: "b", V.UINT16: "H", V.INT16: "h", V.UINT32: "I", V.INT32: "i", V.FLOAT32: "f",
           V.BOOL: "?", V.UINT64: "Q", V.INT64: "q", V.FLOAT64: "d"}  # fmt: skip
FLOATS = {
    gguf.GGMLQuantizationType.F32: np.float32,
    gguf.GGMLQuantizationType.F16: np.float16,
    gguf.GGMLQuantizationType.BF16: np.int16,
}  # fmt: skip  (bf16 bits, reinterpreted by the caller)


class FormatError(ValueError):
    """Not a GGUF file, or one cut short."""


def _f32(value: float) -> float:
    # GGUF stores floats as float32, so 1e-6 reads back as 9.99999997e-07. The shortest decimal that rounds to the
    # same float32 is the number the converter was given (and what from_hf reads from config.json).
    return float(str(np.float32(value)))


@dataclass
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # ggml's order: fastest dimension first ([in, out] for a weight)
    tensor_type: gguf.GGMLQuantizationType
    data: np.ndarray  # float types: the values, row-major (out, in); quantized: bytes, one row per output row


class GGUFFile:
    def __init__(self, buffer: mmap.mmap, metadata: dict[str, Any], tensors: list[TensorInfo]):
        self.buffer, self.metadata, self.tensors = buffer, metadata, tensors

    @classmethod
    def open(cls, path: str | os.PathLike) -> GGUFFile:
        with open(path, "rb") as f:
            if os.fstat(f.fileno()).st_size == 0:
                raise FormatError("the file is empty")
            buffer = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        reader = _Reader(buffer)
        if reader.take(4) != b"GGUF":
            raise FormatError("no GGUF magic at the start")
        version = reader.scalar("I")
        if version > 0xFFFF:
            raise FormatError("a big-endian file (quantized blocks are little-endian only)")
        if version not in (2, 3):
            raise FormatError(f"GGUF version {version} (2 and 3 are read)")
        n_tensors, n_kv = reader.scalar("Q"), reader.scalar("Q")
        metadata = {}
        for _ in range(n_kv):
            key = reader.string()
            metadata[key] = reader.value(V(reader.scalar("I")))
        infos = []
        for _ in range(n_tensors):
            name, n_dims = reader.string(), reader.scalar("I")
            dims = tuple(reader.scalar("Q") for _ in range(n_dims))
            infos.append((name, dims, gguf.GGMLQuantizationType(reader.scalar("I")), reader.scalar("Q")))
        alignment = int(metadata.get("general.alignment", 32))
        start = -(-reader.at // alignment) * alignment
        tensors = [_tensor(buffer, start, *info) for info in infos]
        return cls(buffer, metadata, tensors)

    def release_pages(self) -> None:
        """Drop the file's pages read so far from this process's resident set (they stay in the page cache): a
        load copies the weights out, so keeping them resident would add the file's size to peak RSS."""
        if hasattr(self.buffer, "madvise"):
            self.buffer.madvise(mmap.MADV_DONTNEED)


def _tensor(buffer, start: int, name: str, dims: tuple[int, ...], kind, offset: int) -> TensorInfo:
    block, type_size = gguf.GGML_QUANT_SIZES[kind]
    count = int(np.prod(dims)) if dims else 1
    nbytes = count // block * type_size
    if start + offset + nbytes > len(buffer):
        raise FormatError(f"tensor {name} ends past the end of the file (truncated)")
    raw = np.frombuffer(buffer, dtype=np.uint8, count=nbytes, offset=start + offset)
    if kind in FLOATS:
        data = raw.view(FLOATS[kind]).reshape(tuple(reversed(dims)))
    else:
        rows = count // dims[0] if dims else 1
        data = raw.reshape(rows, -1)
    return TensorInfo(name, tuple(int(d) for d in dims), kind, data)


class _Reader:
    def __init__(self, buffer):
        self.buffer, self.at = buffer, 0

    def take(self, n: int) -> bytes:
        if self.at + n > len(self.buffer):
            raise FormatError("the file ends inside its header (truncated)")
        out = self.buffer[self.at : self.at + n]
        self.at += n
        return out

    def scalar(self, code: str):
        size = struct.calcsize("<" + code)
        if self.at + size > len(self.buffer):
            raise FormatError("the file ends inside its header (truncated)")
        (value,) = struct.unpack_from("<" + code, self.buffer, self.at)
        self.at += size
        return value

    def string(self) -> str:
        return self.take(self.scalar("Q")).decode("utf-8")

    def value(self, kind: V) -> Any:
        if kind == V.STRING:
            return self.string()
        if kind == V.ARRAY:
            item, count = V(self.scalar("I")), self.scalar("Q")
            if item in SCALARS:  # one unpack for the whole array
                code = SCALARS[item]
                size = struct.calcsize("<" + code) * count
                if self.at + size > len(self.buffer):
                    raise FormatError("the file ends inside its header (truncated)")
                values = list(struct.unpack_from(f"<{count}{code}", self.buffer, self.at))
                self.at += size
                return [_f32(v) for v in values] if item == V.FLOAT32 else values
            return [self.value(item) for _ in range(count)]
        value = self.scalar(SCALARS[kind])
        return _f32(value) if kind == V.FLOAT32 else value
