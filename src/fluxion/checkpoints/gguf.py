"""GGUF files of the FLUX transformer, as the community publishes them (city96's ComfyUI-GGUF convention).

Tensors keep the original Black Forest Labs names (`double_blocks.0.img_attn.qkv.weight`, optionally under
`model.diffusion_model.`), the architecture tag is `flux`, large weights are GGML blocks (Q8_0, Q4_K, ...) and
small tensors F32/F16/BF16. GGUF stores dimensions innermost first (GGML's ne[0] is the row length), so a
torch [out, in] weight is listed as (in, out); a `comfy.gguf.orig_shape.<name>` entry overrides the shape.

Reading uses the `gguf` package's GGUFReader (a copy-on-write memory map: quantized weights stay zero-copy
views of the file); dequantization is our own torch code (fluxion.quant.ggml). Writing streams: the header is
laid out from shapes alone, then tensors are read, quantized and written one at a time.
"""
from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ..files import atomic_path
from ..quant import ggml
from ..quant.linear import KEEP_FLOAT, is_kept
from .original import CONFIG_METADATA_KEY, detect_prefix
from .safetensors_file import CheckpointError

ARCH = "flux"
ORIG_SHAPE_KEY = "comfy.gguf.orig_shape."


def _reader(path: Path):
    """GGUFReader with every way a damaged file can fail turned into a CheckpointError naming the file."""
    from gguf import GGUFReader

    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    size = path.stat().st_size
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise CheckpointError(f"{path}: not a GGUF file (it starts with {magic!r}, not b'GGUF')")
    try:
        return GGUFReader(path, "c")  # copy-on-write: writable tensors (torch needs them), the file never changes
    except (ValueError, IndexError, KeyError, TypeError, OverflowError, UnicodeDecodeError, MemoryError) as e:
        raise CheckpointError(
            f"{path}: corrupt or truncated GGUF file ({size} bytes; the reader says: {e}) - an interrupted "
            "download or copy?"
        ) from None


def _string_fields(reader) -> dict[str, str]:
    from gguf import GGUFValueType

    out = {}
    for name, field in reader.fields.items():
        if field.types == [GGUFValueType.STRING]:
            out[name] = bytes(field.parts[field.data[0]]).decode("utf-8", errors="replace")
    return out


def _number_fields(reader) -> dict[str, int | float | bool]:
    """Single-number metadata (llama.cpp's `<arch>.block_count`, `<arch>.attention.layer_norm_rms_epsilon`, ...)."""
    from gguf import GGUFValueType

    out = {}
    for name, field in reader.fields.items():
        if len(field.types) == 1 and field.types[0] not in (GGUFValueType.STRING, GGUFValueType.ARRAY):
            value = field.parts[field.data[0]][0].item()
            out[name] = bool(value) if field.types[0] == GGUFValueType.BOOL else value
    return out


class GGUFStore:
    """The tensors of one GGUF file with the TensorStore interface (keys, shape, dtype, get, release, ...)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        reader = _reader(self.path)
        self.files = [self]
        self.meta = _string_fields(reader)
        self.numbers = _number_fields(reader)
        size = self.path.stat().st_size
        names = [t.name for t in reader.tensors]
        self.prefix = detect_prefix(names)
        self._tensors = {}
        for t in reader.tensors:
            qtype = ggml.BY_ID.get(int(t.tensor_type))
            if qtype is None:
                raise CheckpointError(
                    f"{self.path}: tensor {t.name!r} is stored as {t.tensor_type.name}, which fluxion cannot read "
                    f"(it reads {', '.join(ggml.TYPES)})"
                )
            if t.data_offset + int(t.n_bytes) > size:
                raise CheckpointError(f"{self.path}: tensor {t.name!r} ends past the end of the file: truncated")
            shape = self._orig_shape(reader, t.name) or tuple(int(d) for d in reversed(t.shape.tolist()))
            if ggml.nbytes(qtype, shape) != int(t.n_bytes):
                raise CheckpointError(f"{self.path}: tensor {t.name!r}: shape {list(shape)} does not match its "
                                      f"{t.n_bytes} bytes of {qtype}")
            name = t.name[len(self.prefix):] if self.prefix and t.name.startswith(self.prefix) else t.name
            self._tensors[name] = (qtype, shape, t)

    def _orig_shape(self, reader, name: str) -> tuple[int, ...] | None:
        field = reader.get_field(ORIG_SHAPE_KEY + name)
        return None if field is None else tuple(int(field.parts[i][0]) for i in field.data)

    # ---- the TensorStore interface
    def keys(self) -> list[str]:
        return list(self._tensors)

    def __contains__(self, name: str) -> bool:
        return name in self._tensors

    def _entry(self, name: str):
        if name not in self._tensors:
            raise CheckpointError(f"{self.path}: no tensor named {name!r}")
        return self._tensors[name]

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entry(name)[1]

    def qtype(self, name: str) -> str:
        return self._entry(name)[0]

    def dtype(self, name: str) -> torch.dtype:
        """The float dtype the tensor reads as: its own for F32/F16/BF16, float32 for quantized ones."""
        return ggml.FLOAT_TYPES.get(self.qtype(name), torch.float32)

    def raw(self, name: str) -> Tensor:
        """The stored bytes, a zero-copy uint8 view [rows, row_bytes] of the mapping."""
        qtype, shape, t = self._entry(name)
        data = torch.from_numpy(t.data.view(np.uint8))
        return data.reshape(-1, ggml.row_bytes(qtype, shape[-1]) if shape else data.numel())

    def get(self, name: str, dtype: torch.dtype | None = None) -> Tensor:
        qtype, shape, _ = self._entry(name)
        return ggml.dequantize(self.raw(name), qtype, shape, dtype or self.dtype(name))

    def quantized(self, name: str) -> tuple[str, Tensor, None] | None:
        """(qtype, raw blocks, None) of a 2-D GGML-quantized weight, as QuantLinear keeps it; else None."""
        qtype, shape, _ = self._entry(name)
        if qtype in ggml.FLOAT_TYPES or len(shape) != 2:
            return None
        return qtype, self.raw(name), None

    def release(self, name: str) -> None:
        pass  # the mapping is shared with QuantLinear storages; the kernel drops clean pages when it needs to

    def file_of(self, name: str) -> Path:
        return self.path

    def describe(self) -> str:
        return str(self.path)

    def nbytes(self) -> int:
        return sum(int(t.n_bytes) for _, _, t in self._tensors.values())

    def metadata(self) -> dict[str, str]:
        return self.meta

    def compute_dtype(self) -> torch.dtype:
        """The dtype a model from this file computes in when none is asked: img_in's if stored as floats."""
        if "img_in.weight" not in self:
            return torch.bfloat16
        return ggml.FLOAT_TYPES.get(self.qtype("img_in.weight"), torch.bfloat16)

    def check_flux(self) -> None:
        arch = self.meta.get("general.architecture")
        if arch not in (None, ARCH):
            raise CheckpointError(
                f"{self.path}: a GGUF file for architecture {arch!r}, not a FLUX transformer ({ARCH!r})"
            )

    def type_counts(self) -> dict[str, int]:
        """Parameters per stored type, e.g. {"Q8_0": 11.1e9, "F32": 0.1e9}."""
        counts: dict[str, int] = {}
        for qtype, shape, _ in self._tensors.values():
            counts[qtype] = counts.get(qtype, 0) + int(np.prod(shape))
        return counts


# ---------------------------------------------------------------- writing


class _MappingSource:
    """A dict of tensors seen through the store interface write_gguf reads."""

    def __init__(self, tensors: Mapping[str, Tensor]):
        self.tensors = tensors

    def keys(self):
        return list(self.tensors)

    def shape(self, name):
        return tuple(self.tensors[name].shape)

    def dtype(self, name):
        return self.tensors[name].dtype

    def get(self, name, dtype=None):
        return self.tensors[name]


def tensor_type(name: str, shape, source_dtype: torch.dtype, qtype: str, keep=KEEP_FLOAT) -> str:
    """The GGML type `write_gguf` stores a tensor as: `qtype` for a Linear weight to quantize, else a float type.

    1-D tensors (biases, norm scales) are F32, as in the community files; weights of kept layers (KEEP_FLOAT) and
    rows that are not whole blocks stay in the float type that holds the source exactly (F32, F16 or BF16).
    """
    if len(shape) != 2:
        return "F32"
    module = name.rsplit(".", 1)[0]
    if not name.endswith(".weight") or is_kept(module, keep) or shape[-1] % ggml.block_size(qtype):
        return {torch.float32: "F32", torch.float64: "F32", torch.float16: "F16"}.get(source_dtype, "BF16")
    return qtype


def write_gguf(tensors, path: str | os.PathLike, qtype: str, *, keep=KEEP_FLOAT,
               metadata: Mapping[str, str | int | float | bool] | None = None, config: dict | None = None,
               arch: str = ARCH, types: Mapping[str, str] | None = None, progress=None) -> dict[str, str]:
    """Write FLUX transformer tensors (original names) as a GGUF file; returns {name: GGML type written}.

    `tensors`: a dict name -> float tensor, or any store with keys() / shape(name) / dtype(name) / get(name)
    (e.g. a TensorStore), read one tensor at a time, so a memory-mapped model is never held whole.
    `qtype`: Q8_0, Q4_0, Q4_1, Q5_0, Q5_1 (or F16 / BF16 / F32). `config` (a FluxConfig dict) is stored for the
    loader (RoPE axes cannot be inferred from shapes). Written atomically: a temp file, then a rename.

    Other models (fluxion.checkpoints.t5 writes T5 encoders this way): `arch` is the architecture tag, `types`
    gives some tensors' GGML types explicitly (the rest follow `tensor_type`), `metadata` values may be strings,
    bools, ints (written as uint32) or floats (float32). `progress` wraps the iterable of tensor names as
    they are written (e.g. `functools.partial(tqdm, desc=...)`).
    """
    import gguf

    qtype = {"Q8": "Q8_0", "Q4": "Q4_0"}.get(qtype.upper(), qtype.upper())
    if qtype not in ggml.QUANTIZABLE:
        raise ValueError(f"cannot write GGUF type {qtype!r}; fluxion writes {', '.join(ggml.QUANTIZABLE)}")
    source = _MappingSource(tensors) if isinstance(tensors, Mapping) else tensors
    names = source.keys()
    types = types or {}
    plan = {n: types.get(n) or tensor_type(n, source.shape(n), source.dtype(n), qtype, keep) for n in names}
    with atomic_path(path) as tmp:
        writer = gguf.GGUFWriter(tmp, arch=arch)
        try:
            writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
            writer.add_file_type(int(gguf.LlamaFileType["ALL_F32" if qtype == "F32" else f"MOSTLY_{qtype}"]))
            if config is not None:
                writer.add_string(CONFIG_METADATA_KEY, json.dumps(config))
            for k, v in (metadata or {}).items():
                if isinstance(v, bool):
                    writer.add_bool(k, v)
                elif isinstance(v, int):
                    writer.add_uint32(k, v)
                elif isinstance(v, float):
                    writer.add_float32(k, v)
                else:
                    writer.add_string(k, str(v))
            for n in names:
                shape = tuple(source.shape(n))
                raw_type = gguf.GGMLQuantizationType(ggml.TYPES[plan[n]][2])
                writer.add_tensor_info(n, shape, np.dtype(np.float32), ggml.nbytes(plan[n], shape), raw_dtype=raw_type)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            release = getattr(source, "release", None)
            for n in progress(names) if progress is not None else names:
                data = ggml.quantize(source.get(n), plan[n])
                writer.write_tensor_data(data.reshape(-1).numpy())  # aligns, writes, pads; in header order
                del data
                if release is not None:
                    release(n)
        finally:
            writer.close()
    return plan

