"""The T5 v1.1 encoder (FLUX's text_encoder_2) from quantized files, as the community publishes them.

* GGUF, llama.cpp names (city96's t5-v1_1-xxl-encoder-Q8_0.gguf ..., architecture `t5encoder` or `t5`):
  `token_embd.weight`, `enc.blk.{i}.attn_{q,k,v,o}.weight`, `enc.blk.{i}.attn_rel_b.weight` (block 0),
  `enc.blk.{i}.attn_norm.weight`, `enc.blk.{i}.ffn_{gate,up,down}.weight`, `enc.blk.{i}.ffn_norm.weight`,
  `enc.output_norm.weight` -- the names of gguf-py's MODEL_ARCH.T5ENCODER tensors, and ComfyUI-GGUF's map:
  ffn_gate = wi_0, ffn_up = wi_1 (T5 v1.0's single `wi`), ffn_down = wo.
* .safetensors with transformers' names (`shared.weight`, `encoder.block.{i}.layer.0.SelfAttention.q.weight`,
  ...), float8 (t5xxl_fp8_e4m3fn.safetensors, where even the norms may be float8; "scaled" files with a
  `.scale_weight` per weight) or plain float.

`load_t5_encoder` builds transformers' T5EncoderModel on the meta device and fills it one tensor at a time: the
Linear layers that are stored quantized become fluxion QuantLinear (the weights stay quantized, zero-copy views
of the file, dequantized to the compute dtype at each call) and a quantized token table becomes a QuantEmbedding;
norms and the relative-position bias are read in the compute dtype. The config comes from the tensor shapes
(and a GGUF file's `<arch>.attention.layer_norm_rms_epsilon`). `write_t5_gguf` writes such a file, streaming.
"""
from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from ..quant.embedding import QuantEmbedding
from .gguf import GGUFStore, _MappingSource, write_gguf
from .loading import Recipe, TensorStore, materialize
from .original import count_blocks
from .quantized import Fp8Store, holds_fp8, linear_replacer
from .safetensors_file import CheckpointError

GGUF_ARCH = "t5encoder"
GGUF_ARCHS = ("t5encoder", "t5")
MAX_DISTANCE = 128  # relative_attention_max_distance: every T5 uses 128 and GGUF files do not store it

#: transformers' per-block module path -> llama.cpp's tensor name part
BLOCK_PARTS: dict[str, str] = {
    "layer.0.SelfAttention.q": "attn_q",
    "layer.0.SelfAttention.k": "attn_k",
    "layer.0.SelfAttention.v": "attn_v",
    "layer.0.SelfAttention.o": "attn_o",
    "layer.0.SelfAttention.relative_attention_bias": "attn_rel_b",
    "layer.0.layer_norm": "attn_norm",
    "layer.1.DenseReluDense.wi_0": "ffn_gate",
    "layer.1.DenseReluDense.wi_1": "ffn_up",
    "layer.1.DenseReluDense.wi": "ffn_up",  # T5 v1.0 (not gated)
    "layer.1.DenseReluDense.wo": "ffn_down",
    "layer.1.layer_norm": "ffn_norm",
}
EMBEDDING_NAMES = ("shared.weight", "encoder.embed_tokens.weight")  # tied: one table
_BLOCK = re.compile(r"encoder\.block\.(\d+)\.(.+)\.weight")


def gguf_name(name: str) -> str | None:
    """transformers' T5 encoder tensor name -> llama.cpp's (None for a name no T5 encoder has)."""
    if name in EMBEDDING_NAMES:
        return "token_embd.weight"
    if name == "encoder.final_layer_norm.weight":
        return "enc.output_norm.weight"
    m = _BLOCK.fullmatch(name)
    if m and m.group(2) in BLOCK_PARTS:
        return f"enc.blk.{m.group(1)}.{BLOCK_PARTS[m.group(2)]}.weight"
    return None


# ---------------------------------------------------------------- config from shapes


def _t5_config(shape, has, where: str, eps: float = 1e-6):
    """T5Config of the encoder whose tensors (transformers' names) have these shapes."""
    from transformers import T5Config

    emb = next((n for n in EMBEDDING_NAMES if has(n)), None)
    q = "encoder.block.0.layer.0.SelfAttention.q.weight"
    rel = "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"
    if emb is None or not has(q) or not has("encoder.final_layer_norm.weight"):
        raise CheckpointError(f"{where}: not a T5 encoder checkpoint (no token embedding, block 0 attention or "
                              "final norm under T5's names)")
    if not has(rel):
        raise CheckpointError(f"{where}: missing the relative attention bias of block 0 ({rel!r})")
    gated = has("encoder.block.0.layer.1.DenseReluDense.wi_0.weight")
    up = "encoder.block.0.layer.1.DenseReluDense." + ("wi_1" if gated else "wi") + ".weight"
    if not has(up):
        raise CheckpointError(f"{where}: missing the feed-forward input {up!r}")
    vocab, d_model = shape(emb)
    inner = shape(q)[0]
    buckets, heads = shape(rel)
    if inner % heads:
        raise CheckpointError(f"{where}: attention width {inner} is not a multiple of the {heads} heads of the "
                              "relative attention bias")
    return T5Config(
        vocab_size=vocab, d_model=d_model, d_kv=inner // heads, d_ff=shape(up)[0], num_heads=heads,
        relative_attention_num_buckets=buckets, relative_attention_max_distance=MAX_DISTANCE,
        feed_forward_proj="gated-gelu" if gated else "relu", layer_norm_epsilon=eps, dropout_rate=0.0,
        is_encoder_decoder=False, use_cache=False, num_layers=0,  # set by the caller from the block count
    )


def _open(path: Path):
    """(store, function: transformers' name -> stored name or None, config) for a GGUF or .safetensors T5 file."""
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or folder")
    if path.is_file() and path.suffix == ".gguf":
        store = GGUFStore(path)
        arch = store.meta.get("general.architecture")
        if arch not in GGUF_ARCHS:
            raise CheckpointError(f"{path}: a GGUF file for architecture {arch!r}, not a T5 encoder "
                                  f"({' or '.join(map(repr, GGUF_ARCHS))})")

        def stored(name):
            g = gguf_name(name)
            return g if g is not None and g in store else None

        eps = float(store.numbers.get(f"{arch}.attention.layer_norm_rms_epsilon", 1e-6))
        layers = count_blocks(store.keys(), r"enc\.blk\.(\d+)\.")
    else:
        if path.is_file() and not (path.name.endswith(".safetensors") or path.name.endswith(".index.json")):
            raise CheckpointError(f"{path}: neither a .gguf nor a .safetensors file (or shard index)")
        store = TensorStore.open(path)
        if holds_fp8(store):
            store = Fp8Store(store)
        present = set(store.keys())
        emb = next((n for n in EMBEDDING_NAMES if n in present), None)

        def stored(name):
            if name in present:
                return name
            return emb if name in EMBEDDING_NAMES else None

        eps = 1e-6
        layers = count_blocks(store.keys(), r"encoder\.block\.(\d+)\.")

    def has(name):
        return stored(name) is not None

    config = _t5_config(lambda n: tuple(store.shape(stored(n))), has, store.describe(), eps)
    config.num_layers = layers
    return store, stored, config


# ---------------------------------------------------------------- loading


def load_t5_encoder(path: str | Path, dtype: torch.dtype = torch.bfloat16):
    """transformers' T5EncoderModel (eval mode) from a GGUF or .safetensors (fp8 or float) T5 encoder file.

    Quantized weights stay quantized (QuantLinear / QuantEmbedding, computing in `dtype`); other tensors are
    read in `dtype`. A missing, truncated, corrupt or other-model file raises CheckpointError.
    """
    import transformers
    from transformers import T5EncoderModel

    transformers.utils.logging.set_verbosity_error()
    path = Path(path)
    store, stored, config = _open(path)
    with torch.device("meta"):
        model = T5EncoderModel(config)
    recipes = {}
    for name in model.state_dict():
        src = stored(name)
        if src is None:
            raise CheckpointError(f"{store.describe()}: missing tensor {gguf_name(name) or name!r} (needed for "
                                  f"{name!r}): the checkpoint is incomplete or not a T5 encoder")
        recipes[name] = Recipe((src,))
    linears = linear_replacer(store, recipes, dtype)
    tied: dict[str, nn.Module] = {}

    def replace(name: str, module: nn.Module) -> nn.Module | None:
        if f"{name}.weight" not in EMBEDDING_NAMES:
            return linears(name, module)
        if "table" not in tied:  # built once, shared by `shared` and `encoder.embed_tokens`
            tied["table"] = _embedding(store, recipes[f"{name}.weight"].sources[0], dtype)
        return tied["table"]

    model = materialize(lambda: model, recipes, store, dtype, replace)
    return model.eval()


def _embedding(store, src: str, dtype: torch.dtype) -> nn.Module:
    vocab, dim = store.shape(src)
    quantized = getattr(store, "quantized", None)
    q = quantized(src) if quantized is not None else None
    if q is not None:
        qtype, data, scale = q
        return QuantEmbedding(vocab, dim, qtype, data, scale, dtype)
    return nn.Embedding.from_pretrained(store.get(src, dtype), freeze=True)


# ---------------------------------------------------------------- writing


class _Renamed:
    """A T5 encoder's tensors under transformers' names, seen under llama.cpp's (the order llama.cpp writes)."""

    def __init__(self, source):
        self.source = source
        names = {}
        for name in source.keys():
            if name.startswith(("decoder.", "lm_head.")):
                continue  # a whole T5 checkpoint: the encoder is written
            g = gguf_name(name)
            if g is None:
                raise ValueError(f"{name!r} is not a T5 encoder tensor")
            if g in names:  # encoder.embed_tokens.weight next to shared.weight: the same tied table
                continue
            names[g] = name
        order = lambda g: (0 if g.startswith("token_embd") else 2 if g.startswith("enc.output") else 1,  # noqa: E731
                           int(g.split(".")[2]) if g.startswith("enc.blk.") else 0)
        self.names = dict(sorted(names.items(), key=lambda kv: order(kv[0])))

    def keys(self):
        return list(self.names)

    def shape(self, name):
        return tuple(self.source.shape(self.names[name]))

    def dtype(self, name):
        return self.source.dtype(self.names[name])

    def get(self, name, dtype=None):
        return self.source.get(self.names[name])

    def release(self, name):
        release = getattr(self.source, "release", None)
        if release is not None:
            release(self.names[name])


def write_t5_gguf(tensors, path: str | Path, qtype: str = "Q8_0", *, progress=None,
                  name: str = "t5-v1_1-encoder") -> dict[str, str]:
    """Write a T5 encoder as GGUF in llama.cpp's naming (architecture `t5encoder`); returns {name: GGML type}.

    `tensors`: transformers' names (a state dict, a TensorStore, any store with keys/shape/dtype/get), read one
    at a time; decoder tensors of a whole T5 checkpoint are skipped. The token table and the Linear weights are
    written as `qtype` (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, or F16/BF16/F32), norms and the relative-position bias as
    F32. The hyper-parameters go in llama.cpp's metadata keys; no tokenizer is written (fluxion reads tokenizer
    folders), so llama.cpp itself cannot run the file without one.
    """
    source = _Renamed(_MappingSource(tensors) if isinstance(tensors, Mapping) else tensors)
    hf = source.names
    config = _t5_config(lambda n: source.shape(gguf_name(n)), lambda n: gguf_name(n) in hf, str(path))
    config.num_layers = count_blocks(list(hf), r"enc\.blk\.(\d+)\.")
    types = {g: "F32" for g in hf if ".attn_rel_b." in g}
    a = GGUF_ARCH
    metadata = {
        "general.name": name,
        f"{a}.context_length": 512,
        f"{a}.embedding_length": config.d_model,
        f"{a}.feed_forward_length": config.d_ff,
        f"{a}.block_count": config.num_layers,
        f"{a}.attention.head_count": config.num_heads,
        f"{a}.attention.key_length": config.d_kv,
        f"{a}.attention.value_length": config.d_kv,
        f"{a}.attention.layer_norm_rms_epsilon": float(config.layer_norm_epsilon),
        f"{a}.attention.relative_buckets_count": config.relative_attention_num_buckets,
    }
    return write_gguf(source, path, qtype, keep=(), metadata=metadata, arch=a, types=types, progress=progress)


def t5_parameter_count(config) -> int:
    """Parameters of a T5 encoder (the tied token table counted once)."""
    d, f, inner, n = config.d_model, config.d_ff, config.num_heads * config.d_kv, config.num_layers
    ff = (3 if config.is_gated_act else 2) * d * f
    return config.vocab_size * d + n * (4 * d * inner + ff + 2 * d) + config.relative_attention_num_buckets * \
        config.num_heads + d


__all__ = ["GGUF_ARCH", "gguf_name", "load_t5_encoder", "write_t5_gguf", "t5_parameter_count"]
