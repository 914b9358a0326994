"""GGUF files (llama.cpp's format): the model config, Hugging Face-named float32 weights (or,
for weights="quantized", the raw GGML blocks of the projections and LM head), and the metadata
the tokenizer is built from.

A GGUF file is a header (metadata key/values, then one info record per tensor) followed by the
aligned tensor data. The header is parsed here with `struct`: gguf.GGUFReader builds numpy views
for every item of every metadata array, which takes ~4 s for a 49k-token vocabulary and its
merges, on every open. Tensor data is memory-mapped and dequantized one tensor at a time with
`gguf.quants`, so loading never holds more than the tensor being converted.

    config = read_config("model.gguf")                   # ModelConfig
    for hf_name, array in read_tensors("model.gguf", config):   # float32, HF layout
        ...
    config = read_config("model.gguf", weights="quantized")   # weight_format="q4_1", ...
"""

from __future__ import annotations

import dataclasses
import functools
import math
import mmap
import os
import struct
from collections.abc import Iterator
from typing import Any

import gguf
import numpy as np

from jvt.models.config import ModelConfig

Q = gguf.GGMLQuantizationType
SUPPORTED_ARCHITECTURES = ("llama", "qwen2")
SUPPORTED_TYPES = (Q.F32, Q.F16, Q.BF16, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0,
                   Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K)
# Weights stored in one of these float types load in that dtype by default (see read_config).
_FLOAT_DTYPES = {Q.F16: "float16", Q.BF16: "bfloat16"}
WEIGHTS = ("dense", "quantized")
# GGML types the jvt_qmatmul kernel reads -> their ModelConfig weight_format / head_format.
KERNEL_FORMATS = {Q.Q4_0: "q4_0", Q.Q4_1: "q4_1", Q.Q8_0: "q8_0"}

_MAGIC = b"GGUF"
_VERSIONS = (2, 3)  # version 1 used 32-bit counts and lengths; llama.cpp dropped it in 2023
_DEFAULT_ALIGNMENT = 32
# GGUF metadata value types (gguf.GGUFValueType): struct formats of the scalar ones.
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q",
            12: "d"}
_STRING, _ARRAY = 8, 9
_REQUIRED = object()


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    """Where one tensor's data lies in a GGUF file."""

    name: str
    shape: tuple[int, ...]  # GGML order: shape[0] is the innermost, contiguous dimension
    qtype: gguf.GGMLQuantizationType
    offset: int  # absolute byte offset of the data in the file
    nbytes: int


@dataclasses.dataclass(frozen=True)
class GGUFFile:
    """A parsed GGUF header: metadata values (str, int, float, bool or lists of them) and the
    tensors by name. Tensor data stays on disk until read_tensors maps it."""

    path: str
    metadata: dict[str, Any]
    tensors: dict[str, TensorInfo]


def is_gguf(path: str | os.PathLike) -> bool:
    """Whether path is a file that starts with the GGUF magic bytes (reads 4 bytes)."""
    try:
        with open(path, "rb") as f:
            return f.read(4) == _MAGIC
    except OSError:
        return False


def open_gguf(path: str | os.PathLike) -> GGUFFile:
    """Parse a GGUF file's header and check that every tensor's data lies inside the file.

    Raises ValueError naming the file (and the tensor, where one is at fault) for a missing or
    non-GGUF file, an unsupported version or byte order, a truncated header or truncated data.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"no GGUF file at {path}")
    stat = os.stat(path)
    return _parse(path, stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=4)
def _parse(path: str, size: int, mtime_ns: int) -> GGUFFile:
    """open_gguf's work, once per file version: loading a model reads the header for its
    config, its tokenizer and its weights (about 0.2 s each for SmolLM2's 49k-token
    vocabulary). Callers never modify the returned metadata."""
    if not is_gguf(path):
        raise ValueError(f"{path} is not a GGUF file (it does not start with the GGUF magic)")
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        header = _Header(buf, path)
        metadata, infos = header.parse()
        data_start = header.data_start(metadata)
    tensors = {}
    for name, dims, raw_type, offset in infos:
        if name in tensors:
            raise ValueError(f"{path}: tensor {name!r} appears twice in the header")
        tensors[name] = _tensor_info(path, size, name, dims, raw_type, data_start + offset)
    return GGUFFile(path, metadata, tensors)


class _Header:
    """A cursor over the header bytes; every read past the end raises a ValueError."""

    def __init__(self, buf: mmap.mmap, path: str):
        self.buf, self.path, self.pos = buf, path, len(_MAGIC)

    def parse(self) -> tuple[dict[str, Any], list[tuple[str, list[int], int, int]]]:
        version = self.scalar("I")
        if version not in _VERSIONS:
            swapped = int.from_bytes(version.to_bytes(4, "little"), "big")
            kind = "big-endian GGUF files are" if swapped in _VERSIONS else f"version {version} is"
            raise ValueError(f"{self.path}: {kind} not supported; supported: little-endian GGUF "
                             f"versions {_VERSIONS}")
        n_tensors, n_kv = self.scalar("Q"), self.scalar("Q")
        metadata = {}
        for _ in range(n_kv):
            key = self.string()
            metadata[key] = self.value(self.scalar("I"))
        infos = []
        for _ in range(n_tensors):
            name = self.string()
            dims = [self.scalar("Q") for _ in range(self.scalar("I"))]
            infos.append((name, dims, self.scalar("I"), self.scalar("Q")))
        return metadata, infos

    def data_start(self, metadata: dict[str, Any]) -> int:
        alignment = metadata.get("general.alignment", _DEFAULT_ALIGNMENT)
        if not isinstance(alignment, int) or alignment <= 0:
            raise ValueError(f"{self.path}: general.alignment must be a positive int, "
                             f"got {alignment!r}")
        return -(-self.pos // alignment) * alignment

    def _need(self, n: int) -> None:
        if self.pos + n > len(self.buf):
            raise ValueError(f"{self.path}: the GGUF header is truncated (needs byte "
                             f"{self.pos + n}, the file has {len(self.buf)})")

    def scalar(self, fmt: str):
        self._need(struct.calcsize(fmt))
        (value,) = struct.unpack_from("<" + fmt, self.buf, self.pos)
        self.pos += struct.calcsize(fmt)
        return value

    def string(self) -> str:
        n = self.scalar("Q")
        self._need(n)
        raw, self.pos = self.buf[self.pos:self.pos + n], self.pos + n
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"{self.path}: a GGUF header string is not UTF-8 ({e})") from None

    def value(self, vtype: int):
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            item, count = self.scalar("I"), self.scalar("Q")
            if item in _SCALARS:  # numeric arrays (token types, scores) in one numpy read
                dtype = np.dtype("<" + _SCALARS[item])
                self._need(count * dtype.itemsize)
                values = np.frombuffer(self.buf, dtype, count, self.pos).tolist()
                self.pos += count * dtype.itemsize
                return values
            return [self.value(item) for _ in range(count)]
        if vtype not in _SCALARS:
            raise ValueError(f"{self.path}: unknown GGUF metadata value type {vtype} at byte "
                             f"{self.pos}")
        return self.scalar(_SCALARS[vtype])


def _tensor_info(path: str, size: int, name: str, dims: list[int], raw_type: int,
                 offset: int) -> TensorInfo:
    try:
        qtype = Q(raw_type)
        block, type_bytes = gguf.GGML_QUANT_SIZES[qtype]
    except (ValueError, KeyError):
        raise ValueError(f"{path}: tensor {name!r} has unknown GGML type {raw_type}; "
                         f"supported: {_type_names()}") from None
    if not dims or dims[0] % block:
        raise ValueError(f"{path}: tensor {name!r} of type {qtype.name} has shape {dims}, whose "
                         f"rows are not whole {block}-value blocks")
    nbytes = math.prod(dims) // block * type_bytes
    if offset + nbytes > size:
        raise ValueError(f"{path} is truncated: tensor {name!r} needs bytes up to "
                         f"{offset + nbytes}, the file has {size}")
    return TensorInfo(name, tuple(dims), qtype, offset, nbytes)


def _type_names() -> str:
    return ", ".join(t.name for t in SUPPORTED_TYPES)


# ---- config ----------------------------------------------------------------------------------


def read_config(path: str | os.PathLike, dtype: str | None = None,
                weights: str = "dense") -> ModelConfig:
    """The ModelConfig of a GGUF model of architecture "llama" (Llama 2/3.x, Mistral, SmolLM)
    or "qwen2", from its metadata and tensor list.

    dtype: the caller's choice when given. By default "float16" or "bfloat16" when every weight
    matrix is stored in that type, else "float32": dequantized values (a float16 scale times a
    small integer) are exact in float32 but not always in a 16-bit type.

    weights: "dense" (every weight dequantized into dtype) or "quantized": the q/k/v/o and
    gate/up/down projections keep their GGML blocks (weight_format: their one type, which must
    be Q4_0, Q4_1 or Q8_0) and so does the LM head (tied: the embedding) when it is stored in
    one of those (head_format; else "dense"); dtype must then be float32 (the default).

    Llama 3.1-style rope scaling is read from the tensor rope_freqs.weight (llama.cpp stores the
    per-frequency divisors there) into rope_freq_factors. Raises ValueError for an unsupported
    architecture, tensor type or feature (mixture of experts, sliding windows, rope scaling
    other than none, partial rotary, non-RMS norms) and for missing keys or tensors.
    """
    file = open_gguf(path)
    arch = _architecture(file)
    config = ModelConfig(**_config_fields(file, arch), dtype=dtype or "float32")
    table = _weight_table(config, arch)
    _check_tensors(file, table)
    if weights not in WEIGHTS:
        raise ValueError(f"weights must be one of {WEIGHTS}, got {weights!r}")
    if weights == "quantized":
        return dataclasses.replace(config, dtype=dtype or "float32",
                                   **_quantized_formats(file, table))
    if dtype is None:
        config = dataclasses.replace(config, dtype=_stored_dtype(file, table))
    return config


def _architecture(file: GGUFFile) -> str:
    arch = _key(file, "general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(f"{file.path}: unsupported GGUF architecture {arch!r}; supported: "
                         f"{', '.join(SUPPORTED_ARCHITECTURES)}")
    return arch


def _key(file: GGUFFile, key: str, default: Any = _REQUIRED, kind: type | None = None):
    """The metadata value of key (of Python type kind when given), or default when absent."""
    if key not in file.metadata:
        if default is _REQUIRED:
            raise ValueError(f"{file.path}: the GGUF metadata has no {key!r}")
        return default
    value = file.metadata[key]
    if kind is not None and not _is_a(value, kind):
        raise ValueError(f"{file.path}: GGUF metadata {key!r} must be a single "
                         f"{kind.__name__}, got {value!r:.80}")
    return value


def _is_a(value: Any, kind: type) -> bool:
    if isinstance(value, bool):  # bool is an int subclass, but never a count or a size
        return kind is bool
    return isinstance(value, kind) or (kind is float and isinstance(value, int))


def _config_fields(file: GGUFFile, arch: str) -> dict[str, Any]:
    def key(name, default=_REQUIRED, kind=int):
        return _key(file, f"{arch}.{name}", default, kind)

    _reject_unsupported(file, arch)
    hidden, heads = key("embedding_length"), key("attention.head_count")
    if f"{arch}.attention.key_length" not in file.metadata and hidden % heads:
        raise ValueError(f"{file.path}: embedding_length {hidden} is not a multiple of "
                         f"head_count {heads} and the file gives no attention.key_length")
    head_dim = key("attention.key_length", hidden // heads)
    for name in ("attention.value_length", "rope.dimension_count"):
        value = key(name, head_dim)
        if value != head_dim:
            raise ValueError(f"{file.path}: {arch}.{name} = {value} differs from head_dim "
                             f"{head_dim}; supported: value and rotary dimensions equal to "
                             "head_dim (no partial rotary)")
    embedding = _tensor(file, "token_embd.weight")
    return {
        "vocab_size": key("vocab_size", embedding.shape[-1]),
        "hidden_size": hidden,
        "intermediate_size": key("feed_forward_length"),
        "num_layers": key("block_count"),
        "num_heads": heads,
        "num_kv_heads": key("attention.head_count_kv", heads),
        "head_dim": head_dim,
        "rope_theta": float(key("rope.freq_base", 10000.0, float)),
        "rope_freq_factors": _rope_freq_factors(file),
        "rms_norm_eps": float(key("attention.layer_norm_rms_epsilon", kind=float)),
        "tie_embeddings": "output.weight" not in file.tensors,
        "qkv_bias": arch == "qwen2",
        "max_position_embeddings": key("context_length"),
        **_special_ids(file),
    }


def _reject_unsupported(file: GGUFFile, arch: str) -> None:
    meta = file.metadata
    if meta.get("split.count", 1) > 1:
        raise ValueError(f"{file.path} is one part of a split GGUF model ({meta['split.count']} "
                         "files), which is not supported; merge the parts into one file first "
                         "(llama.cpp's llama-gguf-split --merge)")
    experts = meta.get(f"{arch}.expert_count", 0)
    if experts:
        raise ValueError(f"{file.path}: mixture-of-experts models ({arch}.expert_count = "
                         f"{experts}) are not supported; supported: dense {arch} models")
    window = meta.get(f"{arch}.attention.sliding_window")
    context = meta.get(f"{arch}.context_length")
    if window is not None and (context is None or window < context):
        raise ValueError(f"{file.path}: sliding-window attention ({arch}.attention.sliding_window"
                         f" = {window}) is not supported; supported: full causal attention")
    scaling = meta.get(f"{arch}.rope.scaling.type", "none")
    factor = meta.get(f"{arch}.rope.scaling.factor", 1.0)
    # llama.cpp applies a factor whatever the type says, and reads 0 as "no factor".
    if scaling not in ("none", "linear") or factor not in (0.0, 1.0):
        raise ValueError(f"{file.path}: rope scaling {scaling!r} with factor {factor} is not "
                         "supported; supported: none (Llama 3.1-style scaling, which llama.cpp "
                         "stores as the tensor rope_freqs.weight, is supported)")
    if f"{arch}.attention.layer_norm_epsilon" in meta and (
            f"{arch}.attention.layer_norm_rms_epsilon" not in meta):
        raise ValueError(f"{file.path}: LayerNorm models are not supported; supported: RMSNorm "
                         f"({arch}.attention.layer_norm_rms_epsilon)")


def _rope_freq_factors(file: GGUFFile) -> tuple[float, ...] | None:
    info = file.tensors.get("rope_freqs.weight")
    if info is None:
        return None
    _check_type(file, info)
    return tuple(_dequantize(file, info).reshape(-1).tolist())


def _special_ids(file: GGUFFile) -> dict[str, Any]:
    def token(name):
        return _key(file, f"tokenizer.ggml.{name}_token_id", None, int)

    # End of turn / end of message (Llama 3 <|eot_id|>, <|eom_id|>) also end a generation.
    eos = tuple(dict.fromkeys(t for t in (token("eos"), token("eot"), token("eom"))
                              if t is not None))
    return {"bos_token_id": token("bos"),
            "eos_token_id": eos[0] if len(eos) == 1 else (eos or None)}


def _stored_dtype(file: GGUFFile, table: list[tuple[str, str, tuple, int | None]]) -> str:
    matrices = {file.tensors[g].qtype for g, _, shape, _ in table if len(shape) == 2}
    if len(matrices) == 1 and (only := matrices.pop()) in _FLOAT_DTYPES:
        return _FLOAT_DTYPES[only]
    return "float32"


def _quantized_formats(file: GGUFFile, table: list[tuple[str, str, tuple, int | None]]
                       ) -> dict[str, str]:
    """weight_format and head_format of read_config(weights="quantized")."""
    types = {file.tensors[g].qtype for g, hf, _, _ in table if hf.endswith("_proj.weight")}
    if len(types) != 1 or next(iter(types)) not in KERNEL_FORMATS:
        found = ", ".join(sorted(t.name for t in types))
        raise ValueError(f"{file.path}: weights='quantized' needs every q/k/v/o/gate/up/down "
                         f"projection stored in one type among "
                         f"{', '.join(t.name for t in KERNEL_FORMATS)}; this file has {found} "
                         "(load it with weights='dense' to dequantize)")
    head = "output.weight" if "output.weight" in file.tensors else "token_embd.weight"
    return {"weight_format": KERNEL_FORMATS[types.pop()],
            "head_format": KERNEL_FORMATS.get(file.tensors[head].qtype, "dense")}


# ---- weights ---------------------------------------------------------------------------------


def read_tensors(path: str | os.PathLike, config: ModelConfig
                 ) -> Iterator[tuple[str, np.ndarray]]:
    """Every weight of a GGUF model as (Hugging Face name, float32 array in HF layout).

    Names are those of transformers' Llama/Qwen2 checkpoints: model.embed_tokens.weight,
    model.layers.{i}.input_layernorm.weight, model.layers.{i}.self_attn.{q,k,v,o}_proj.weight
    (and .bias of q/k/v for qwen2), model.layers.{i}.post_attention_layernorm.weight,
    model.layers.{i}.mlp.{gate,up,down}_proj.weight, model.norm.weight, and lm_head.weight
    unless config.tie_embeddings. Linear weights are [out_features, in_features]. The rows of
    llama's q/k projections are put back in HF order (llama.cpp's converter interleaves the two
    rotary halves of every head); qwen2 files are stored unpermuted.

    Weights config keeps quantized (config.weight_format: the *_proj weights; head_format: the
    LM head, i.e. lm_head.weight or, tied, the embedding) come as their raw GGML blocks instead:
    uint8 [out_features, in_features / 32 * block bytes], rows in HF order (un-permuting whole
    rows of blocks is exact). Their stored type must be that format.

    Everything is checked before the first tensor is yielded (names, shapes, types, unexpected
    tensors: ValueError naming the file and the tensor); then one tensor is dequantized at a
    time from the memory-mapped file.
    """
    file = open_gguf(path)
    arch = _architecture(file)
    table = _weight_table(config, arch)
    _check_tensors(file, table)
    kept = {g: fmt for g, hf, _, _ in table if (fmt := _kept_format(config, hf)) != "dense"}
    for gguf_name, fmt in kept.items():
        stored = file.tensors[gguf_name].qtype
        if KERNEL_FORMATS.get(stored) != fmt:
            raise ValueError(f"{file.path}: tensor {gguf_name!r} is stored as {stored.name}, but "
                             f"the config keeps it in {fmt!r} (weight_format "
                             f"{config.weight_format!r}, head_format {config.head_format!r})")
    for gguf_name, hf_name, _, heads in table:
        info = file.tensors[gguf_name]
        array = _blocks(file, info) if gguf_name in kept else _dequantize(file, info)
        yield hf_name, array if heads is None else _unpermute_rows(array, heads)


def _kept_format(config: ModelConfig, hf_name: str) -> str:
    """The format config keeps the HF weight hf_name in ("dense": dequantized)."""
    if hf_name.endswith("_proj.weight"):
        return config.weight_format
    if hf_name == "lm_head.weight" or (hf_name == "model.embed_tokens.weight"
                                       and config.tie_embeddings):
        return config.head_format
    return "dense"


def _weight_table(c: ModelConfig, arch: str) -> list[tuple[str, str, tuple, int | None]]:
    """(GGUF name, HF name, HF shape, heads to un-permute or None) of every weight."""
    hidden, inter, vocab = c.hidden_size, c.intermediate_size, c.vocab_size
    q_rows, kv_rows = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    # llama.cpp's converter permutes llama's q/k rows for its interleaved RoPE (LlamaModel.permute
    # in convert_hf_to_gguf.py); Qwen2Model writes them as HF has them.
    q_heads, k_heads = (c.num_heads, c.num_kv_heads) if arch == "llama" else (None, None)
    table = [("token_embd.weight", "model.embed_tokens.weight", (vocab, hidden), None)]
    for i in range(c.num_layers):
        blk, hf = f"blk.{i}.", f"model.layers.{i}."
        table += [
            (blk + "attn_norm.weight", hf + "input_layernorm.weight", (hidden,), None),
            (blk + "attn_q.weight", hf + "self_attn.q_proj.weight", (q_rows, hidden), q_heads),
            (blk + "attn_k.weight", hf + "self_attn.k_proj.weight", (kv_rows, hidden), k_heads),
            (blk + "attn_v.weight", hf + "self_attn.v_proj.weight", (kv_rows, hidden), None),
        ]
        if c.qkv_bias:
            table += [
                (blk + "attn_q.bias", hf + "self_attn.q_proj.bias", (q_rows,), q_heads),
                (blk + "attn_k.bias", hf + "self_attn.k_proj.bias", (kv_rows,), k_heads),
                (blk + "attn_v.bias", hf + "self_attn.v_proj.bias", (kv_rows,), None),
            ]
        table += [
            (blk + "attn_output.weight", hf + "self_attn.o_proj.weight", (hidden, q_rows), None),
            (blk + "ffn_norm.weight", hf + "post_attention_layernorm.weight", (hidden,), None),
            (blk + "ffn_gate.weight", hf + "mlp.gate_proj.weight", (inter, hidden), None),
            (blk + "ffn_up.weight", hf + "mlp.up_proj.weight", (inter, hidden), None),
            (blk + "ffn_down.weight", hf + "mlp.down_proj.weight", (hidden, inter), None),
        ]
    table.append(("output_norm.weight", "model.norm.weight", (hidden,), None))
    if not c.tie_embeddings:
        table.append(("output.weight", "lm_head.weight", (vocab, hidden), None))
    return table


def _check_tensors(file: GGUFFile, table: list[tuple[str, str, tuple, int | None]]) -> None:
    for gguf_name, _, shape, _ in table:
        info = _tensor(file, gguf_name)
        if info.shape[::-1] != shape:
            raise ValueError(f"{file.path}: tensor {gguf_name!r} has shape {info.shape[::-1]} "
                             f"(HF order), expected {shape} from the model's metadata")
        _check_type(file, info)
    # rope_freqs.weight is read by read_config; anything else would be silently ignored.
    unexpected = sorted(set(file.tensors) - {g for g, *_ in table} - {"rope_freqs.weight"})
    if unexpected:
        more = f" (+{len(unexpected) - 5} more)" if len(unexpected) > 5 else ""
        raise ValueError(f"{file.path}: unsupported tensors {unexpected[:5]}{more}: this model "
                         "has parts jvt does not implement (supported: the tensors of a dense "
                         "llama/qwen2 decoder, plus rope_freqs.weight)")


def _tensor(file: GGUFFile, name: str) -> TensorInfo:
    if name not in file.tensors:
        raise ValueError(f"{file.path}: tensor {name!r} is missing")
    return file.tensors[name]


def _check_type(file: GGUFFile, info: TensorInfo) -> None:
    if info.qtype not in SUPPORTED_TYPES:
        raise ValueError(f"{file.path}: tensor {info.name!r} has type {info.qtype.name}, which "
                         f"jvt cannot dequantize; supported: {_type_names()}")


def _dequantize(file: GGUFFile, info: TensorInfo) -> np.ndarray:
    """The tensor as a float32 array of shape info.shape reversed (row-major, HF order)."""
    block, type_bytes = gguf.GGML_QUANT_SIZES[info.qtype]
    row_bytes = info.shape[0] // block * type_bytes
    raw = np.memmap(file.path, np.uint8, "r", offset=info.offset, shape=(info.nbytes,))
    raw = raw.reshape(-1, row_bytes)
    if info.qtype == Q.F32:
        values = raw.view("<f4").copy()  # an array of its own, not a view of the mapped file
    else:
        values = gguf.quants.dequantize(raw, info.qtype)
    return values.reshape(info.shape[::-1])


def _blocks(file: GGUFFile, info: TensorInfo) -> np.ndarray:
    """The tensor's raw blocks as a uint8 array [rows, row bytes] of its own."""
    block, type_bytes = gguf.GGML_QUANT_SIZES[info.qtype]
    raw = np.memmap(file.path, np.uint8, "r", offset=info.offset, shape=(info.nbytes,))
    return np.array(raw.reshape(-1, info.shape[0] // block * type_bytes))


def _unpermute_rows(w: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's row permutation of a q/k projection (weight or bias).

    Per head of D rows, the converter stores HF row j*D/2 + i at row 2i + j (i < D/2, j < 2):
    reshape(heads, 2, D/2).swapaxes(1, 2). Its inverse swaps the same axes back.
    """
    d = w.shape[0] // heads
    return w.reshape(heads, d // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
