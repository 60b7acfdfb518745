"""Quantized transformer checkpoints: GGUF read/write, quantize-at-load, fp8 .safetensors, `fluxion quantize`.

The `gguf` package is the oracle for file contents: its GGUFReader and numpy dequantization check what we
write, and its GGUFWriter makes files as other tools do (K-quants, prefixes, other architectures).
"""
import json

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from fluxion.checkpoints import (
    CheckpointError,
    inspect_checkpoint,
    load_transformer,
    quantize_to_gguf,
    save_transformer,
    write_gguf,
)
from fluxion.cli import build_parser, main
from fluxion.quant import QuantLinear, quantize_model, quantized_layers
from fluxion.quant.ggml import TYPES
from tiny_quant import rel_err, run, tiny_inputs, tiny_model

G = gguf.GGMLQuantizationType
WRITABLE = ["q8_0", "q4_0", "q4_1", "q5_0", "q5_1"]


@pytest.fixture(scope="module")
def model():
    return tiny_model(seed=3)


@pytest.fixture(scope="module")
def original_file(model, tmp_path_factory):
    path = tmp_path_factory.mktemp("quant") / "flux-tiny.safetensors"
    save_transformer(model, path)
    return path


def gguf_oracle(path) -> dict[str, np.ndarray]:
    """Every tensor of a GGUF file as the gguf package reads and dequantizes it (torch shape)."""
    reader = gguf.GGUFReader(path)
    return {t.name: gguf.quants.dequantize(t.data, t.tensor_type).reshape(tuple(reversed(t.shape.tolist())))
            for t in reader.tensors}


def stored_value(model, name: str) -> torch.Tensor:
    """A model tensor by its checkpoint name, dequantized (float32) for a QuantLinear weight."""
    owner, _, attr = name.rpartition(".")
    layer = model.get_submodule(owner)
    if isinstance(layer, QuantLinear) and attr == "weight":
        return layer.dequantized_weight(torch.float32)
    return model.state_dict()[name]


def same_state(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("qtype", WRITABLE)
def test_gguf_round_trip(model, tmp_path, qtype):
    path = tmp_path / f"tiny-{qtype}.gguf"
    plan = write_gguf(model.state_dict(), path, qtype, config=model.config.to_dict())
    assert plan["double_blocks.0.img_attn.qkv.weight"] == qtype.upper()
    assert plan["double_blocks.0.img_attn.qkv.bias"] == "F32" and plan["img_in.weight"] == "F32"
    assert plan["double_blocks.0.img_mod.lin.weight"] == "F32"  # kept layers: lossless float
    reader = gguf.GGUFReader(path)
    t = next(t for t in reader.tensors if t.name == "single_blocks.1.linear2.weight")
    assert t.tensor_type == G[qtype.upper()] and t.shape.tolist() == [320, 64]  # GGML order: (in, out)
    assert bytes(reader.get_field("general.architecture").parts[-1]) == b"flux"

    loaded = load_transformer(path)
    assert loaded.config == model.config and loaded.dtype == torch.float32
    assert set(quantized_layers(loaded).values()) == {qtype.upper()} and len(quantized_layers(loaded)) == 20
    for name, value in gguf_oracle(path).items():
        assert np.array_equal(stored_value(loaded, name).numpy(), value), name
    # a GGUF is the same model as quantizing the float model (bit-identical weights)
    assert same_state(loaded, quantize_model(tiny_model(seed=3), qtype))


def test_gguf_is_what_quantize_at_load_gives_and_computes_in_bf16(model, original_file, tmp_path):
    quantize_to_gguf(original_file, tmp_path / "a.gguf", "q8_0")
    from_gguf = load_transformer(tmp_path / "a.gguf", torch.bfloat16)
    # blocks quantized from the float32 file, everything else in bf16
    at_load = load_transformer(original_file, quantize="q8_0").to(torch.bfloat16)
    assert same_state(from_gguf, at_load) and from_gguf.dtype == torch.bfloat16
    x = tiny_inputs(model.config)
    assert rel_err(run(from_gguf, x), run(model, x)) < 0.03


@pytest.mark.parametrize("qtype", ["int8", "w8a8", "fp8", "q8_0", "q4_0"])
@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_quantize_at_load_equals_quantizing_after_loading(original_file, qtype, dtype):
    at_load = load_transformer(original_file, dtype, quantize=qtype)
    after = quantize_model(load_transformer(original_file, dtype), qtype)
    assert same_state(at_load, after)
    assert quantized_layers(at_load) == quantized_layers(after) and len(quantized_layers(at_load)) == 20
    x = tiny_inputs(at_load.config)
    # not bit-equal: the float layers of `after` are views of the file's mapping, whose alignment changes BLAS results
    assert torch.allclose(run(at_load, x), run(after, x), rtol=1e-4, atol=1e-5)


def test_diffusers_folder_quantizes_at_load_and_to_gguf(tiny_dev_dir, tmp_path):
    float_model = load_transformer(tiny_dev_dir)
    at_load = load_transformer(tiny_dev_dir, quantize="q8_0")  # fused qkv built from to_q/to_k/to_v, then quantized
    assert same_state(at_load, quantize_model(load_transformer(tiny_dev_dir), "q8_0"))
    quantize_to_gguf(tiny_dev_dir, tmp_path / "dev.gguf", "q5_1")
    loaded = load_transformer(tmp_path / "dev.gguf")
    assert loaded.config == float_model.config  # RoPE axes come from the stored config
    x = tiny_inputs(loaded.config)
    assert rel_err(run(loaded, x), run(float_model, x)) < 0.08


def k_quant_file(path, qtype: str, prefix: str = "", arch: str | None = "flux", seed: int = 0):
    """A FLUX GGUF as the community writes it: K-quant block weights (random blocks), F32 small tensors."""
    model = tiny_model(seed=seed, hidden_size=256, num_heads=2, depth=1, depth_single_blocks=1, axes_dim=(32, 48, 48))
    writer = gguf.GGUFWriter(path, arch=arch or "x")
    if arch is None:
        writer.kv_data[0].pop("general.architecture")
    g = torch.Generator().manual_seed(seed)
    for name, t in model.state_dict().items():
        if t.ndim == 2 and "_in" not in name and "final_layer" not in name:
            _, ts, _ = TYPES[qtype]
            raw = torch.randint(0, 256, (t.shape[0], t.shape[1] // 256 * ts), dtype=torch.uint8, generator=g)
            blocks = raw.view(-1, ts)
            for off in ([208] if qtype == "Q6_K" else [0, 2]):  # finite f16 scales
                blocks[:, off : off + 2] = (torch.rand(blocks.shape[0], 1, generator=g) * 1e-3).half().view(torch.uint8)
            writer.add_tensor(prefix + name, raw.numpy(), raw_dtype=G[qtype])
        else:
            writer.add_tensor(prefix + name, t.numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return model


@pytest.mark.parametrize("qtype", ["Q4_K", "Q5_K", "Q6_K"])
def test_k_quant_files_load_like_gguf_dequantizes_them(tmp_path, qtype):
    path = tmp_path / f"k-{qtype}.gguf"
    prefix = "model.diffusion_model." if qtype == "Q5_K" else ""
    k_quant_file(path, qtype, prefix=prefix, arch=None if qtype == "Q6_K" else "flux")
    loaded = load_transformer(path, axes_dim=(32, 48, 48))
    assert set(quantized_layers(loaded).values()) == {qtype}
    for name, value in gguf_oracle(path).items():
        assert np.array_equal(stored_value(loaded, name[len(prefix):]).numpy(), value), name
    out = run(loaded, tiny_inputs(loaded.config))
    assert out.shape == (1, 16, 16) and torch.isfinite(out).all()
    info = inspect_checkpoint(path)
    assert info["format"].startswith("GGUF") and qtype in info["dtypes"] and info["part"] == "transformer"


def test_write_gguf_is_atomic(model, tmp_path):
    from fluxion.checkpoints.gguf import _MappingSource

    class Failing(_MappingSource):  # a source that breaks after two tensors (a read error, a full disk...)
        reads = 0

        def get(self, name, dtype=None):
            self.reads += 1
            if self.reads > 2:
                raise OSError("read error")
            return super().get(name, dtype)

    path = tmp_path / "out.gguf"
    with pytest.raises(OSError, match="read error"):
        write_gguf(Failing(model.state_dict()), path, "q8")
    assert list(tmp_path.iterdir()) == []  # no partial file, no temp file
    assert write_gguf(Failing(dict(list(model.state_dict().items())[:2])), path, "q8")
    assert [p.name for p in tmp_path.iterdir()] == ["out.gguf"]


def test_damaged_gguf_files_fail_clearly(original_file, tmp_path):
    good = tmp_path / "good.gguf"
    quantize_to_gguf(original_file, good, "q8_0")
    data = good.read_bytes()
    cases = {
        "truncated.gguf": (data[: len(data) // 2], "corrupt or truncated GGUF file"),
        "cut-in-header.gguf": (data[:300], "corrupt or truncated GGUF file"),
        "last-bytes-missing.gguf": (data[:-7], "corrupt or truncated GGUF file"),
        "garbage.gguf": (b"GGUF" + bytes(range(256)) * 3, "corrupt or truncated GGUF file"),
        "empty.gguf": (b"", "not a GGUF file"),
        "text.gguf": (b"hello, world" * 20, "not a GGUF file"),
    }
    for name, (blob, message) in cases.items():
        bad = tmp_path / name
        bad.write_bytes(blob)
        with pytest.raises(CheckpointError, match=message) as e:
            load_transformer(bad)
        assert str(bad) in str(e.value)


def test_gguf_of_another_architecture_or_type_is_refused(tmp_path):
    path = tmp_path / "llama.gguf"
    k_quant_file(path, "Q4_K", arch="llama")
    with pytest.raises(CheckpointError, match="architecture 'llama', not a FLUX transformer"):
        load_transformer(path)
    path = tmp_path / "q2k.gguf"
    writer = gguf.GGUFWriter(path, arch="flux")
    writer.add_tensor("img_in.weight", np.zeros((4, 84), dtype=np.uint8), raw_dtype=G.Q2_K)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(CheckpointError, match="'img_in.weight' is stored as Q2_K, which fluxion cannot read"):
        load_transformer(path)


def fp8_file(model, path, scaled: bool):
    """Weights as float8_e4m3fn (2-D), other tensors bf16; scaled: ComfyUI's `scale_weight` per layer, a marker."""
    tensors, expected = {}, {}
    prefix = "model.diffusion_model." if scaled else ""
    for name, t in model.state_dict().items():
        if t.ndim == 2:
            scale = t.abs().amax() / 448 if scaled else torch.tensor(1.0)
            q = (t / scale).to(torch.float8_e4m3fn)
            tensors[prefix + name] = q
            if scaled:
                tensors[prefix + name[: -len(".weight")] + ".scale_weight"] = scale.reshape(1)
                tensors[prefix + name[: -len(".weight")] + ".scale_input"] = torch.ones(1)
            expected[name] = q.float() * scale
        else:
            tensors[prefix + name] = t.to(torch.bfloat16)
            expected[name] = t.to(torch.bfloat16)
    if scaled:
        tensors["scaled_fp8"] = torch.empty(0, dtype=torch.float8_e4m3fn)
    save_file(tensors, str(path), metadata={"fluxion_config": json.dumps(model.config.to_dict())})  # RoPE axes
    return expected


@pytest.mark.parametrize("scaled", [False, True])
def test_fp8_safetensors_load_as_fp8_layers(model, tmp_path, scaled):
    path = tmp_path / "fp8.safetensors"
    expected = fp8_file(model, path, scaled)
    loaded = load_transformer(path)
    assert loaded.dtype == torch.bfloat16  # the file's other floats
    layers = quantized_layers(loaded)
    assert len(layers) == 36 and set(layers.values()) == {"F8_E4M3"}  # every Linear: the file decides
    for name, value in expected.items():
        assert torch.equal(stored_value(loaded, name), value), name
    # the same numbers as a float model holding the dequantized weights
    reference = tiny_model(seed=3)
    reference.load_state_dict({k: v.float() for k, v in expected.items()})
    x = tiny_inputs(model.config)
    assert rel_err(run(loaded.float(), x), run(reference, x)) < 0.02  # bf16 activations vs float32
    assert rel_err(run(load_transformer(path, torch.float32), x), run(reference, x)) < 1e-5
    info = inspect_checkpoint(path)
    assert "float8_e4m3fn" in info["dtypes"] and info["config"] == model.config.to_dict()


def test_quantize_cli_round_trip(original_file, tmp_path, capsys):
    out = tmp_path / "cli-q4_1.gguf"
    assert main(["quantize", str(original_file), str(out), "--type", "q4_1"]) == 0
    assert "wrote" in capsys.readouterr().out
    loaded = load_transformer(out)
    assert same_state(loaded, load_transformer(original_file, quantize="q4_1"))
    assert main(["info", str(out)]) == 0
    text = capsys.readouterr().out
    assert "GGUF" in text and "Q4_1" in text and "dev-style" in text
    with pytest.raises(SystemExit):  # K-quants are read-only: not a choice
        main(["quantize", str(original_file), str(tmp_path / "x.gguf"), "--type", "q4_k"])
    assert main(["quantize", str(tmp_path / "missing.safetensors"), str(tmp_path / "y.gguf")]) == 2
    assert "missing.safetensors" in capsys.readouterr().err and not (tmp_path / "y.gguf").exists()
    args = build_parser().parse_args(["generate", "a cat", "--quantize", "q8_0"])
    assert args.quantize == "q8_0"


def test_save_transformer_refuses_quantized_models(tmp_path):
    with pytest.raises(ValueError, match="quantized: save_transformer writes float weights"):
        save_transformer(quantize_model(tiny_model(), "int8"), tmp_path / "x.safetensors")
