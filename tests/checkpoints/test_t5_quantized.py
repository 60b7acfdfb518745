"""T5 encoders from quantized files: GGUF (llama.cpp names) and fp8 .safetensors (transformers' names).

A tiny T5 v1.1 (d_model 32, 2 layers, gated-gelu, relative attention) stands in for T5-XXL. Oracles: the `gguf`
package (its tensor-name table for MODEL_ARCH.T5ENCODER, its reader, dequantizer and writer) and transformers'
float T5EncoderModel with the same weights.

Tolerances (relative L2 error of the last hidden states):
* loaded model vs the float model holding exactly the file's (dequantized) weights: < 1e-5 (same float32 math);
* vs the original float model: Q8_0 < 0.03, fp8 < 0.1, Q4_0 < 0.3 (tiny rows of 32 or 64 values: one or two
  blocks per row, so 4-bit errors do not average out as at real widths; measured 0.011 / 0.06 / 0.17).
"""
import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from transformers import T5Config, T5EncoderModel

from fluxion.checkpoints import CheckpointError, write_gguf
from fluxion.checkpoints.t5 import gguf_name, load_t5_encoder, write_t5_gguf
from fluxion.model.text_encoders import T5Embedder
from fluxion.pipelines.base import REPO_ROOT
from fluxion.quant import QuantEmbedding, QuantLinear
from fluxion.quant.linear import quantize_fp8
from tiny_quant import rel_err, tiny_model

TINY_T5 = dict(vocab_size=96, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, feed_forward_proj="gated-gelu",
               relative_attention_num_buckets=32, relative_attention_max_distance=128, dropout_rate=0.0,
               is_encoder_decoder=False, use_cache=False)
LINEARS = ("q", "k", "v", "o", "wi_0", "wi_1", "wo")


@pytest.fixture(scope="module")
def float_t5():
    torch.manual_seed(0)
    return T5EncoderModel(T5Config(**TINY_T5)).eval()


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, TINY_T5["vocab_size"], (2, 24), generator=torch.Generator().manual_seed(1))


@torch.no_grad()
def encode(model, ids):
    return model(input_ids=ids).last_hidden_state.float()


def with_weights(values: dict[str, torch.Tensor]):
    """A float T5 holding exactly these tensors (transformers' names)."""
    model = T5EncoderModel(T5Config(**TINY_T5)).eval()
    state = {k: values.get(k, values.get("shared.weight") if k == "encoder.embed_tokens.weight" else None)
             for k in model.state_dict()}
    model.load_state_dict({k: v.float() for k, v in state.items()})
    return model


def gguf_values(path) -> dict[str, torch.Tensor]:
    """The file's tensors under transformers' names, as the gguf package reads and dequantizes them."""
    reader = gguf.GGUFReader(path)
    by_gguf = {t.name: torch.from_numpy(np.array(gguf.quants.dequantize(t.data, t.tensor_type)).reshape(
        tuple(reversed(t.shape.tolist())))).float() for t in reader.tensors}
    names = {gguf_name(n): n for n in T5EncoderModel(T5Config(**TINY_T5)).state_dict()
             if n != "encoder.embed_tokens.weight"}
    return {names[g]: v for g, v in by_gguf.items()}


@pytest.fixture(scope="module", params=["Q8_0", "Q4_0"])
def gguf_file(request, float_t5, tmp_path_factory):
    path = tmp_path_factory.mktemp("t5gguf") / f"t5-tiny-{request.param}.gguf"
    write_t5_gguf(float_t5.state_dict(), path, request.param)
    return request.param, path


def test_gguf_file_uses_llama_cpp_names_and_metadata(gguf_file, float_t5):
    qtype, path = gguf_file
    reader = gguf.GGUFReader(path)
    arch = bytes(reader.fields["general.architecture"].parts[-1]).decode()
    assert arch == "t5encoder"
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.T5ENCODER, TINY_T5["num_layers"])
    expected = {names.get_name(k, try_suffixes=(".weight",)) for k in float_t5.state_dict()
                if k != "encoder.embed_tokens.weight"}  # tied to shared.weight: gguf-py maps only that name
    assert {t.name for t in reader.tensors} == expected  # the tied embedding once, as token_embd.weight
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["token_embd.weight"] == qtype and types["enc.blk.1.ffn_gate.weight"] == qtype
    assert types["enc.blk.0.attn_rel_b.weight"] == "F32" and types["enc.output_norm.weight"] == "F32"
    assert int(reader.fields["t5encoder.block_count"].parts[-1][0]) == 2
    assert int(reader.fields["t5encoder.attention.head_count"].parts[-1][0]) == 4


def test_gguf_round_trip(gguf_file, float_t5, ids):
    qtype, path = gguf_file
    model = load_t5_encoder(path, torch.float32)
    block = model.encoder.block[1]
    assert isinstance(block.layer[0].SelfAttention.q, QuantLinear) and block.layer[0].SelfAttention.q.qtype == qtype
    assert isinstance(block.layer[1].DenseReluDense.wo, QuantLinear)
    assert isinstance(model.shared, QuantEmbedding) and model.encoder.embed_tokens is model.shared
    values = gguf_values(path)
    assert torch.equal(model.encoder.block[0].layer[1].DenseReluDense.wi_0.dequantized_weight(torch.float32),
                       values["encoder.block.0.layer.1.DenseReluDense.wi_0.weight"])
    out = encode(model, ids)
    assert rel_err(out, encode(with_weights(values), ids)) < 1e-5
    assert rel_err(out, encode(float_t5, ids)) < {"Q8_0": 0.03, "Q4_0": 0.3}[qtype]


def test_gguf_bf16_compute(gguf_file, float_t5, ids):
    qtype, path = gguf_file
    model = load_t5_encoder(path)  # bf16 by default
    assert model.shared.dtype == torch.bfloat16 and model.encoder.final_layer_norm.weight.dtype == torch.bfloat16
    out = encode(model, ids)
    assert torch.isfinite(out).all()
    assert rel_err(out, encode(float_t5, ids)) < {"Q8_0": 0.05, "Q4_0": 0.3}[qtype]


def test_gguf_from_the_gguf_package_writer(float_t5, ids, tmp_path):
    """A file as llama.cpp's converter lays it out (architecture "t5", F16 norms), written by gguf's own writer."""
    path = tmp_path / "t5-other.gguf"
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.T5, TINY_T5["num_layers"])
    w = gguf.GGUFWriter(path, arch="t5")
    w.add_layer_norm_rms_eps(1e-6)
    for k, v in float_t5.state_dict().items():
        if k == "encoder.embed_tokens.weight":
            continue
        name = names.get_name(k, try_suffixes=(".weight",))
        data = v.numpy()
        if data.ndim == 2 and "rel_b" not in name:
            qt = gguf.GGMLQuantizationType.Q8_0
            w.add_tensor(name, gguf.quants.quantize(data, qt), raw_dtype=qt)
        else:
            w.add_tensor(name, data.astype(np.float16))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    out = encode(load_t5_encoder(path, torch.float32), ids)
    assert rel_err(out, encode(float_t5, ids)) < 0.03


def fp8_file(model, path, scaled: bool) -> dict[str, torch.Tensor]:
    """Write `model` as community fp8 files do; returns the real (dequantized) values under transformers' names.

    scaled=False: t5xxl_fp8_e4m3fn.safetensors style, every tensor cast to float8 (norms too), no scales.
    scaled=True: "scaled fp8": 2-D weights as float8 with a `.scale_weight` each and a `scaled_fp8` marker,
    1-D tensors in bf16.
    """
    tensors, values = {}, {}
    for k, v in model.state_dict().items():
        if k == "encoder.embed_tokens.weight":
            continue
        if scaled and v.ndim == 2:
            q, scale = quantize_fp8(v)
            tensors[k] = q.view(torch.float8_e4m3fn)
            tensors[k[: -len(".weight")] + ".scale_weight"] = scale.reshape(1)
            values[k] = q.view(torch.float8_e4m3fn).float() * scale
        elif scaled:
            tensors[k] = v.to(torch.bfloat16)
            values[k] = tensors[k].float()
        else:
            tensors[k] = v.to(torch.float8_e4m3fn)
            values[k] = tensors[k].float()
    if scaled:
        tensors["scaled_fp8"] = torch.zeros(0, dtype=torch.float8_e4m3fn)
    save_file(tensors, str(path))
    return values


@pytest.mark.parametrize("scaled", [False, True], ids=["fp8", "scaled-fp8"])
def test_fp8_round_trip(float_t5, ids, tmp_path, scaled):
    path = tmp_path / "t5xxl_fp8_e4m3fn.safetensors"
    values = fp8_file(float_t5, path, scaled)
    model = load_t5_encoder(path, torch.float32)
    q = model.encoder.block[0].layer[0].SelfAttention.q
    assert isinstance(q, QuantLinear) and q.qtype == "F8_E4M3"
    assert isinstance(model.shared, QuantEmbedding) and model.encoder.embed_tokens is model.shared
    out = encode(model, ids)
    assert rel_err(out, encode(with_weights(values), ids)) < 1e-5
    assert rel_err(out, encode(float_t5, ids)) < 0.1


def test_float_safetensors_with_both_embedding_names(float_t5, ids, tmp_path):
    path = tmp_path / "model.safetensors"
    save_file({k: v.clone().contiguous() for k, v in float_t5.state_dict().items()}, str(path))
    model = load_t5_encoder(path, torch.float32)
    assert isinstance(model.shared, torch.nn.Embedding) and model.encoder.embed_tokens is model.shared
    assert rel_err(encode(model, ids), encode(float_t5, ids)) < 1e-6


def test_t5_embedder_from_checkpoint(gguf_file):
    _, path = gguf_file
    embedder = T5Embedder.from_checkpoint(path, REPO_ROOT / "models" / "fluxion-mini" / "tokenizer_2")
    out = embedder(["a red circle"], 16)
    assert out.shape == (1, 16, TINY_T5["d_model"]) and out.dtype == torch.bfloat16
    assert embedder.dtype == torch.bfloat16


# ---------------------------------------------------------------- bad files


def test_truncated_gguf_fails_clearly(gguf_file, tmp_path):
    _, path = gguf_file
    bad = tmp_path / "t5-truncated.gguf"
    bad.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated|corrupt"):
        load_t5_encoder(bad)


def test_not_a_gguf_or_garbage_fails_clearly(tmp_path):
    bad = tmp_path / "t5.gguf"
    bad.write_bytes(b"not a gguf file at all" * 10)
    with pytest.raises(CheckpointError, match="not a GGUF file"):
        load_t5_encoder(bad)
    junk = tmp_path / "t5.safetensors"
    junk.write_bytes(b"\xff" * 64)
    with pytest.raises(CheckpointError, match="t5.safetensors"):
        load_t5_encoder(junk)
    with pytest.raises(CheckpointError, match="no such file"):
        load_t5_encoder(tmp_path / "missing.gguf")


def test_flux_gguf_is_not_a_t5(tmp_path):
    path = tmp_path / "flux.gguf"
    write_gguf(tiny_model(seed=0).state_dict(), path, "Q8_0")
    with pytest.raises(CheckpointError, match="architecture 'flux'"):
        load_t5_encoder(path)


def test_flux_safetensors_is_not_a_t5(tmp_path):
    path = tmp_path / "flux.safetensors"
    save_file({k: v.contiguous() for k, v in tiny_model(seed=0).state_dict().items()}, str(path))
    with pytest.raises(CheckpointError, match="not a T5 encoder"):
        load_t5_encoder(path)


def test_missing_and_misshapen_tensors_fail_clearly(float_t5, tmp_path):
    state = dict(float_t5.state_dict())
    missing = {k: v for k, v in state.items() if k != "encoder.block.1.layer.0.SelfAttention.v.weight"}
    path = tmp_path / "missing.gguf"
    write_t5_gguf(missing, path, "Q8_0")
    with pytest.raises(CheckpointError, match="enc.blk.1.attn_v.weight"):
        load_t5_encoder(path)
    misshapen = dict(state)
    misshapen["encoder.block.1.layer.1.DenseReluDense.wo.weight"] = torch.zeros(32, 32)
    path = tmp_path / "misshapen.safetensors"
    save_file({k: v.contiguous() for k, v in misshapen.items() if k != "encoder.embed_tokens.weight"}, str(path))
    with pytest.raises(CheckpointError, match="wo.weight"):
        load_t5_encoder(path)
