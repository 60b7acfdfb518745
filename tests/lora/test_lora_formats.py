"""LoRA files in and out, checked against an independent hand computation: for each file made here, the
weight change it should make to each of fluxion's (fused, original-layout) layers is worked out from the
layout's rules (delta = alpha/r * up @ down on the right rows), and compared with what fluxion's
fuse_lora writes into the weights. Also: bad files fail with one clear error before anything changes,
the diffusers-layout writer splits fused layers back exactly, and the file API (folder / file / dict)."""
from __future__ import annotations

import json
import logging

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import fluxion
from fluxion.lora import LoraPiece, attach_adapter

H, MLP = 32, 128  # tiny transformer: hidden 32, mlp 128; linear1 rows = q, k, v (32 each) then mlp (128)
TE = "text_encoder"
TR = "transformer"


@pytest.fixture(scope="module")
def shared_pipe(tiny_dev_dir):
    pipe = fluxion.FluxPipeline.from_pretrained(tiny_dev_dir, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture
def pipe(shared_pipe):
    shared_pipe.unload_lora_weights()
    yield shared_pipe
    shared_pipe.unfuse_lora()
    shared_pipe.unload_lora_weights()


# ---------------------------------------------------------------- helpers

class Maker:
    """Random LoRA tensors, and the deltas they should make (the independent expectation)."""

    def __init__(self, seed=0):
        self.g = torch.Generator().manual_seed(seed)
        self.sd: dict[str, torch.Tensor] = {}
        self.expected: dict[tuple[str, str], torch.Tensor] = {}

    def pair(self, rank, n_in, n_out):
        return (torch.randn(rank, n_in, generator=self.g) * 0.3, torch.randn(n_out, rank, generator=self.g) * 0.3)

    def expect(self, comp, module, delta, rows=None, shape=None):
        full = self.expected.setdefault((comp, module), torch.zeros(shape))
        if rows is None:
            full += delta
        else:
            full[rows[0]:rows[1]] += delta


def model_of(pipe, comp):
    return pipe.transformer if comp == TR else pipe.clip.model


def weights(pipe):
    return {(comp, n): m.weight.detach().clone() for comp in (TR, TE)
            for n, m in model_of(pipe, comp).named_modules() if isinstance(m, torch.nn.Linear)}


def fused_deltas(pipe, source, **kwargs):
    """Load `source`, fuse it, and return {(component, module): W_fused - W} for every changed layer."""
    before = weights(pipe)
    name = pipe.load_lora_weights(source, **kwargs)
    pipe.fuse_lora(components=[TR, TE])
    after = weights(pipe)
    pipe.unfuse_lora()
    restored = weights(pipe)
    assert all(torch.equal(restored[k], v) for k, v in before.items())
    pipe.delete_adapters(name)
    return {k: after[k] - before[k] for k in before if not torch.equal(after[k], before[k])}


def assert_deltas(got, expected, atol=1e-5):
    assert sorted(got) == sorted(expected), (sorted(got), sorted(expected))
    for k, want in expected.items():
        torch.testing.assert_close(got[k], want, atol=atol, rtol=1e-5, msg=lambda m: f"{k}: {m}")


def kohya_name(module):
    return "lora_unet_" + module.replace(".", "_")


def te_module(i, part):
    return f"encoder.layers.{i}.{part}"  # transformers 5 CLIPTextModel names (no text_model. prefix)


# ---------------------------------------------------------------- layouts in

def test_kohya_with_alphas(pipe, tmp_path):
    mk = Maker(1)
    cases = [  # (our module, rank, alpha or None, in, out)
        ("double_blocks.0.img_attn.qkv", 4, 2.0, H, 3 * H),
        ("double_blocks.1.txt_attn.qkv", 2, 8.0, H, 3 * H),
        ("double_blocks.1.txt_attn.proj", 3, None, H, H),  # no alpha: scale 1
        ("double_blocks.0.img_mod.lin", 2, 1.0, H, 6 * H),
        ("double_blocks.0.txt_mlp.0", 4, 4.0, H, MLP),
        ("single_blocks.0.linear1", 4, 3.0, H, 3 * H + MLP),  # all rows: q, k, v and mlp
        ("single_blocks.1.linear2", 2, 5.0, H + MLP, H),
        ("single_blocks.1.modulation.lin", 2, 2.0, H, 3 * H),
        ("final_layer.adaLN_modulation.1", 2, 1.0, H, 2 * H),  # original names: no swap
        ("final_layer.linear", 2, 3.0, H, 16),
        ("time_in.in_layer", 2, 2.0, 256, H),
        ("img_in", 2, 2.0, 16, H),
    ]
    for module, r, alpha, n_in, n_out in cases:
        down, up = mk.pair(r, n_in, n_out)
        mk.sd[f"{kohya_name(module)}.lora_down.weight"] = down
        mk.sd[f"{kohya_name(module)}.lora_up.weight"] = up
        if alpha is not None:
            mk.sd[f"{kohya_name(module)}.alpha"] = torch.tensor(alpha)
        mk.expect(TR, module, (alpha if alpha is not None else r) / r * up @ down, shape=(n_out, n_in))
    for i, part, n_in, n_out in ((0, "self_attn.q_proj", H, H), (1, "mlp.fc1", H, 37)):
        stem = "lora_te1_text_model_" + te_module(i, part).replace(".", "_")
        down, up = mk.pair(2, n_in, n_out)
        mk.sd |= {f"{stem}.lora_down.weight": down, f"{stem}.lora_up.weight": up, f"{stem}.alpha": torch.tensor(3.0)}
        mk.expect(TE, te_module(i, part), 1.5 * up @ down, shape=(n_out, n_in))
    save_file(mk.sd, str(tmp_path / "kohya.safetensors"))
    assert_deltas(fused_deltas(pipe, tmp_path / "kohya.safetensors"), mk.expected)


def test_kohya_naming_diffusers_modules(pipe):
    """`lora_transformer_<diffusers module>` keys (what diffusers calls the "mixture" kohya files)."""
    mk = Maker(2)
    for dmod, module, rows, n_in, n_out in (
        ("single_transformer_blocks.0.attn.to_k", "single_blocks.0.linear1", (H, 2 * H), H, 3 * H + MLP),
        ("transformer_blocks.1.attn.add_v_proj", "double_blocks.1.txt_attn.qkv", (2 * H, 3 * H), H, 3 * H),
        ("transformer_blocks.0.ff.net.2", "double_blocks.0.img_mlp.2", None, MLP, H),
    ):
        n_rows = n_out if rows is None else rows[1] - rows[0]
        down, up = mk.pair(2, n_in, n_rows)
        stem = "lora_transformer_" + dmod.replace(".", "_")
        mk.sd |= {f"{stem}.lora_down.weight": down, f"{stem}.lora_up.weight": up, f"{stem}.alpha": torch.tensor(4.0)}
        mk.expect(TR, module, 2.0 * up @ down, rows, (n_out, n_in))
    assert_deltas(fused_deltas(pipe, mk.sd), mk.expected)


def test_xlabs(pipe, tmp_path):
    mk = Maker(3)
    for i in range(2):
        for proc, module, n_in, n_out in (
            ("qkv_lora1", "img_attn.qkv", H, 3 * H), ("qkv_lora2", "txt_attn.qkv", H, 3 * H),
            ("proj_lora1", "img_attn.proj", H, H), ("proj_lora2", "txt_attn.proj", H, H),
        ):
            down, up = mk.pair(4, n_in, n_out)
            mk.sd[f"double_blocks.{i}.processor.{proc}.down.weight"] = down
            mk.sd[f"double_blocks.{i}.processor.{proc}.up.weight"] = up
            mk.expect(TR, f"double_blocks.{i}.{module}", up @ down, shape=(n_out, n_in))  # XLabs: no alpha
    down, up = mk.pair(4, H, 3 * H)
    mk.sd |= {"single_blocks.0.processor.qkv_lora.down.weight": down, "single_blocks.0.processor.qkv_lora.up.weight": up}
    mk.expect(TR, "single_blocks.0.linear1", up @ down, (0, 3 * H), (3 * H + MLP, H))  # q, k, v rows only
    down, up = mk.pair(4, H + MLP, H)
    mk.sd |= {"single_blocks.1.processor.proj_lora.down.weight": down, "single_blocks.1.processor.proj_lora.up.weight": up}
    mk.expect(TR, "single_blocks.1.linear2", up @ down, shape=(H, H + MLP))
    save_file(mk.sd, str(tmp_path / "xlabs.safetensors"))
    assert_deltas(fused_deltas(pipe, tmp_path, weight_name="xlabs.safetensors"), mk.expected)


@pytest.mark.parametrize("prefix,names", [
    ("diffusion_model.", ("lora_A", "lora_B")),
    ("model.diffusion_model.", ("lora_down", "lora_up")),
    ("", ("lora_A", "lora_B")),
])
def test_original_keys(pipe, prefix, names):
    mk = Maker(4)
    for module, n_in, n_out, alpha in (
        ("double_blocks.0.img_attn.qkv", H, 3 * H, 6.0),
        ("double_blocks.1.img_mlp.0", H, MLP, None),
        ("single_blocks.1.linear1", H, 3 * H + MLP, 1.0),
        ("final_layer.adaLN_modulation.1", H, 2 * H, 2.0),
    ):
        down, up = mk.pair(3, n_in, n_out)
        mk.sd[f"{prefix}{module}.{names[0]}.weight"] = down
        mk.sd[f"{prefix}{module}.{names[1]}.weight"] = up
        if alpha is not None:
            mk.sd[f"{prefix}{module}.alpha"] = torch.tensor(alpha)
        mk.expect(TR, module, (alpha or 3) / 3 * up @ down, shape=(n_out, n_in))
    assert_deltas(fused_deltas(pipe, mk.sd), mk.expected)


def _diffusers_layout(mk, prefix="transformer.", alphas=None, default_alpha=None):
    """Separate q/k/v (different A's) on a single block, proj_mlp rows, norm_out.linear (halves swapped)."""
    specs = [  # (diffusers module, our module, rows, in, out, rank)
        ("single_transformer_blocks.0.attn.to_q", "single_blocks.0.linear1", (0, H), H, 3 * H + MLP, 2),
        ("single_transformer_blocks.0.attn.to_k", "single_blocks.0.linear1", (H, 2 * H), H, 3 * H + MLP, 2),
        ("single_transformer_blocks.0.attn.to_v", "single_blocks.0.linear1", (2 * H, 3 * H), H, 3 * H + MLP, 4),
        ("single_transformer_blocks.1.proj_mlp", "single_blocks.1.linear1", (3 * H, 3 * H + MLP), H, 3 * H + MLP, 2),
        ("transformer_blocks.0.attn.add_k_proj", "double_blocks.0.txt_attn.qkv", (H, 2 * H), H, 3 * H, 2),
        ("transformer_blocks.1.attn.to_out.0", "double_blocks.1.img_attn.proj", None, H, H, 2),
        ("transformer_blocks.1.norm1_context.linear", "double_blocks.1.txt_mod.lin", None, H, 6 * H, 2),
        ("x_embedder", "img_in", None, 16, H, 2),
    ]
    out = []
    for dmod, module, rows, n_in, n_out, r in specs:
        n_rows = n_out if rows is None else rows[1] - rows[0]
        A, B = mk.pair(r, n_in, n_rows)
        mk.sd[f"{prefix}{dmod}.lora_A.weight"] = A
        mk.sd[f"{prefix}{dmod}.lora_B.weight"] = B
        alpha = (alphas or {}).get(dmod, r if default_alpha is None else default_alpha)
        mk.expect(TR, module, alpha / r * B @ A, rows, (n_out, n_in))
        out.append(dmod)
    # norm_out.linear: diffusers rows are (scale; shift), ours (shift; scale)
    A, B = mk.pair(2, H, 2 * H)
    mk.sd[f"{prefix}norm_out.linear.lora_A.weight"] = A
    mk.sd[f"{prefix}norm_out.linear.lora_B.weight"] = B
    alpha = (alphas or {}).get("norm_out.linear", 2 if default_alpha is None else default_alpha)
    mk.expect(TR, "final_layer.adaLN_modulation.1", alpha / 2 * torch.cat([B[H:], B[:H]]) @ A, shape=(2 * H, H))
    return out + ["norm_out.linear"]


@pytest.mark.parametrize("prefix", ["transformer.", ""])
def test_diffusers_layout_default_scale_one(pipe, prefix):
    mk = Maker(5)
    _diffusers_layout(mk, prefix)
    assert_deltas(fused_deltas(pipe, mk.sd), mk.expected)


def test_diffusers_layout_alpha_keys_and_text_encoder(pipe):
    mk = Maker(6)
    alphas = {"single_transformer_blocks.0.attn.to_v": 1.0, "norm_out.linear": 6.0, "x_embedder": 0.5}
    _diffusers_layout(mk, alphas=alphas)
    for dmod, a in alphas.items():
        mk.sd[f"transformer.{dmod}.alpha"] = torch.tensor(a)
    for name in ("text_model.encoder.layers.0.self_attn.v_proj", "encoder.layers.1.self_attn.out_proj"):
        A, B = mk.pair(2, H, H)
        mk.sd |= {f"text_encoder.{name}.lora_A.weight": A, f"text_encoder.{name}.lora_B.weight": B}
        mk.expect(TE, name.removeprefix("text_model."), B @ A, shape=(H, H))
    assert_deltas(fused_deltas(pipe, mk.sd), mk.expected)


def test_diffusers_layout_metadata_alphas(pipe, tmp_path):
    """PEFT config in the safetensors metadata (as diffusers writes it): lora_alpha 8 for all, except
    alpha 3 (alpha_pattern) for the rank-4 (rank_pattern) to_v."""
    mk = Maker(7)
    modules = _diffusers_layout(mk, alphas={"single_transformer_blocks.0.attn.to_v": 3.0}, default_alpha=8.0)
    config = {"transformer.r": 2, "transformer.lora_alpha": 8, "transformer.target_modules": modules,
              "transformer.rank_pattern": {"^single_transformer_blocks.0.attn.to_v": 4},
              "transformer.alpha_pattern": {"single_transformer_blocks.0.attn.to_v": 3}}
    save_file(mk.sd, str(tmp_path / "pytorch_lora_weights.safetensors"),
              metadata={"format": "pt", "lora_adapter_metadata": json.dumps(config)})
    assert_deltas(fused_deltas(pipe, tmp_path), mk.expected)  # folder: the default weight name


def test_t5_parts_skipped_with_one_warning(pipe, caplog):
    mk = Maker(8)
    A, B = mk.pair(2, H, H)
    mk.sd |= {"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": A,
              "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": B}
    mk.expect(TR, "double_blocks.0.img_attn.qkv", B @ A, (0, H), (3 * H, H))
    for i in range(3):
        mk.sd[f"lora_te2_encoder_block_{i}_layer_0_SelfAttention_q.lora_down.weight"] = torch.randn(2, 32)
        mk.sd[f"lora_te2_encoder_block_{i}_layer_0_SelfAttention_q.lora_up.weight"] = torch.randn(32, 2)
    mk.sd["text_encoder_2.encoder.block.0.layer.0.SelfAttention.q.lora_A.weight"] = torch.randn(2, 32)
    with caplog.at_level(logging.WARNING, logger="fluxion.lora"):
        got = fused_deltas(pipe, mk.sd)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "skipped 7 of 9 keys" in warnings[0].getMessage()
    assert_deltas(got, mk.expected)


# ---------------------------------------------------------------- bad files

def _state(pipe):
    return weights(pipe), pipe.get_list_adapters(), pipe.get_active_adapters()


@pytest.mark.parametrize("bad,message", [
    ({"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.randn(2, H),
      "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": torch.randn(H, 2),
      "some_model.layer.weight": torch.randn(3, 3)},
     r"^some_model\.layer\.weight: not a LoRA key of any layout"),
    ({"lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": torch.randn(4, H),
      "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": torch.randn(3 * H, 4),
      "lora_unet_double_blocks_1_img_attn_proj.lora_down.weight": torch.randn(4, 48),
      "lora_unet_double_blocks_1_img_attn_proj.lora_up.weight": torch.randn(H, 4)},
     r"^lora_unet_double_blocks_1_img_attn_proj\.lora_down\.weight: shape \[4, 48\] does not fit transformer "
     r"layer double_blocks\.1\.img_attn\.proj \(expected \[rank, 32\]\)"),
    ({"transformer.single_transformer_blocks.0.attn.to_v.lora_A.weight": torch.randn(2, H),
      "transformer.single_transformer_blocks.0.attn.to_v.lora_B.weight": torch.randn(3 * H, 2)},
     r"single_transformer_blocks\.0\.attn\.to_v\.lora_B\.weight: shape \[96, 2\] does not fit transformer layer "
     r"single_blocks\.0\.linear1 rows \[64:96\] \(expected \[32, 2\]\)"),
    ({"lora_unet_double_blocks_7_img_attn_qkv.lora_down.weight": torch.randn(4, H),  # a deeper model's LoRA
      "lora_unet_double_blocks_7_img_attn_qkv.lora_up.weight": torch.randn(3 * H, 4)},
     r"^lora_unet_double_blocks_7_img_attn_qkv\.lora_down\.weight: not a LoRA key"),
    ({"diffusion_model.img_in.lora_A.weight": torch.randn(2, 16)}, r"lora_A\.weight: its LoRA up/B weight is missing"),
    ({"transformer.x_embedder.lora_A.weight": torch.randn(2, 16), "transformer.x_embedder.lora_B.weight":
      torch.randn(H, 2), "transformer.x_embedder.lora_magnitude_vector": torch.randn(H)}, r"DoRA"),
    ({}, r"empty"),
    ({"lora_te2_encoder_block_0_layer_0_SelfAttention_q.lora_down.weight": torch.randn(2, 32)}, r"nothing to load"),
])
def test_bad_files_fail_before_anything_is_attached(pipe, tmp_path, bad, message):
    good = Maker(9)
    A, B = good.pair(2, 16, H)
    pipe.load_lora_weights({"transformer.x_embedder.lora_A.weight": A, "transformer.x_embedder.lora_B.weight": B},
                           adapter_name="keep")
    before = _state(pipe)
    save_file(bad, str(tmp_path / "bad.safetensors")) if bad else None
    for src in ([bad, tmp_path / "bad.safetensors"] if bad else [bad]):
        with pytest.raises(ValueError, match=message):
            pipe.load_lora_weights(src, adapter_name="bad")
        after = _state(pipe)
        assert after[1:] == before[1:] == ({TR: ["keep"]}, ["keep"])
        assert all(torch.equal(after[0][k], v) for k, v in before[0].items())


def test_bad_arguments(pipe, tmp_path):
    with pytest.raises(ValueError, match="no such LoRA file"):
        pipe.load_lora_weights(tmp_path / "missing.safetensors")
    with pytest.raises(TypeError, match="unexpected keyword argument 'bogus'"):
        pipe.load_lora_weights({}, bogus=1)
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="junk.safetensors"):
        pipe.load_lora_weights(tmp_path / "junk.safetensors")
    A, B = Maker(1).pair(2, 16, H)
    sd = {"transformer.x_embedder.lora_A.weight": A, "transformer.x_embedder.lora_B.weight": B}
    pipe.load_lora_weights(sd, adapter_name="a")
    with pytest.raises(ValueError, match="already loaded"):
        pipe.load_lora_weights(sd, adapter_name="a")
    assert pipe.get_list_adapters() == {TR: ["a"]}


# ---------------------------------------------------------------- out, and back in

def test_save_splits_fused_layers_exactly_and_round_trips(pipe, tmp_path):
    """kohya pieces on whole fused layers, a piece on a row range crossing q/k, two pieces on one layer:
    saved in diffusers layout (split per diffusers module), read back, same weight changes."""
    mk = Maker(10)
    for module, n_in, n_out, alpha in (("double_blocks.0.img_attn.qkv", H, 3 * H, 2.0),
                                       ("single_blocks.0.linear1", H, 3 * H + MLP, 6.0),
                                       ("final_layer.adaLN_modulation.1", H, 2 * H, 4.0)):
        down, up = mk.pair(4, n_in, n_out)
        mk.sd |= {f"{kohya_name(module)}.lora_down.weight": down, f"{kohya_name(module)}.lora_up.weight": up,
                  f"{kohya_name(module)}.alpha": torch.tensor(alpha)}
        mk.expect(TR, module, alpha / 4 * up @ down, shape=(n_out, n_in))
    expected_once = fused_deltas(pipe, mk.sd)
    assert_deltas(expected_once, mk.expected)

    name = pipe.load_lora_weights(mk.sd, adapter_name="k")
    # two more pieces: rows [8:40] of a txt qkv (part of q and of k), and a second piece on img_attn.qkv
    t = pipe.transformer
    g = torch.Generator().manual_seed(11)
    extra = {"double_blocks.1.txt_attn.qkv": [LoraPiece(torch.randn(2, H, generator=g), torch.randn(32, 2, generator=g), 0.5, (8, 40))]}
    attach_adapter(t, "extra", extra)
    extra_delta = torch.zeros(3 * H, H)
    extra_delta[8:40] = 0.5 * extra["double_blocks.1.txt_attn.qkv"][0].B @ extra["double_blocks.1.txt_attn.qkv"][0].A
    out = pipe.save_lora_weights(tmp_path / "k", adapter_name=name, base_model="tiny-dev")
    out2 = pipe.save_lora_weights(tmp_path / "e.safetensors", adapter_name="extra")
    assert out == tmp_path / "k" / "pytorch_lora_weights.safetensors" and out2 == tmp_path / "e.safetensors"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e.safetensors", "k"]  # no temp files left
    assert [p.name for p in (tmp_path / "k").iterdir()] == ["pytorch_lora_weights.safetensors"]

    with safe_open(str(out), "pt") as f:
        keys, meta = list(f.keys()), f.metadata()
        tensors = {k: f.get_tensor(k) for k in keys}
    d = "transformer.single_transformer_blocks.0."
    assert sorted(keys) == sorted(
        [f"transformer.transformer_blocks.0.attn.to_{x}.lora_{ab}.weight" for x in "qkv" for ab in "AB"]
        + [f"{d}attn.to_{x}.lora_{ab}.weight" for x in "qkv" for ab in "AB"]
        + [f"{d}proj_mlp.lora_{ab}.weight" for ab in "AB"]
        + [f"transformer.norm_out.linear.lora_{ab}.weight" for ab in "AB"])
    up = mk.sd["lora_unet_single_blocks_0_linear1.lora_up.weight"]
    assert torch.equal(tensors[f"{d}attn.to_k.lora_B.weight"], up[H:2 * H])
    assert torch.equal(tensors[f"{d}proj_mlp.lora_B.weight"], up[3 * H:])
    assert torch.equal(tensors[f"{d}proj_mlp.lora_A.weight"], mk.sd["lora_unet_single_blocks_0_linear1.lora_down.weight"])
    up = mk.sd["lora_unet_final_layer_adaLN_modulation_1.lora_up.weight"]
    assert torch.equal(tensors["transformer.norm_out.linear.lora_B.weight"], torch.cat([up[H:], up[:H]]))
    peft = json.loads(meta["lora_adapter_metadata"])
    assert peft["transformer.r"] == 4 and meta["fluxion.base_model"] == "tiny-dev"
    assert sorted(peft["transformer.alpha_pattern"].values()) == [2] * 3 + [4]  # linear1 (6) is the common one
    assert peft["transformer.lora_alpha"] == 6 and meta["fluxion.rank"] == "4"
    assert "transformer.single_blocks.0.linear1" in json.loads(meta["fluxion.targets"])
    with safe_open(str(out2), "pt") as f:  # the [8:40] piece: zero rows where it does not reach
        q_b = f.get_tensor("transformer.transformer_blocks.1.attn.add_q_proj.lora_B.weight")
        assert q_b.shape == (H, 2) and not q_b[:8].any() and q_b[8:].abs().sum() > 0
        assert sorted(f.keys()) == [f"transformer.transformer_blocks.1.attn.add_{x}_proj.lora_{ab}.weight"
                                    for x in "kq" for ab in "AB"]

    pipe.unload_lora_weights()
    assert_deltas(fused_deltas(pipe, out), mk.expected)
    assert_deltas(fused_deltas(pipe, out2), {(TR, "double_blocks.1.txt_attn.qkv"): extra_delta})

    # two adapters of one file on the same diffusers module are joined into one LoRA of the summed rank
    attach_adapter(t, "two", {"img_in": [LoraPiece(torch.randn(2, 16, generator=g), torch.randn(H, 2, generator=g), 0.5),
                                         LoraPiece(torch.randn(3, 16, generator=g), torch.randn(H, 3, generator=g), 2.0)]})
    want = sum(p.scale * p.B @ p.A for p in pipe.transformer.img_in._fluxion_lora.adapters["two"])
    out3 = pipe.save_lora_weights(tmp_path / "two.safetensors", adapter_name="two")
    pipe.unload_lora_weights()
    assert_deltas(fused_deltas(pipe, out3), {(TR, "img_in"): want})


def test_text_encoder_adapter_saved_and_hotswapped(pipe, tmp_path):
    mk = Maker(12)
    stems = ["text_encoder.text_model.encoder.layers.0.self_attn.k_proj", "transformer.proj_out"]
    for stem, n_in, n_out in zip(stems, (H, H), (H, 16)):
        A, B = mk.pair(2, n_in, n_out)
        mk.sd |= {f"{stem}.lora_A.weight": A, f"{stem}.lora_B.weight": B, f"{stem}.alpha": torch.tensor(1.0)}
    pipe.load_lora_weights(mk.sd, adapter_name="x")
    path = pipe.save_lora_weights(tmp_path)
    with safe_open(str(path), "pt") as f:
        assert sorted(f.keys()) == sorted(f"{s}.lora_{ab}.weight" for s in stems for ab in "AB")
        assert json.loads(f.metadata()["lora_adapter_metadata"])["text_encoder.lora_alpha"] == 1

    swap = {k: torch.randn_like(v) if v.ndim == 2 else v for k, v in mk.sd.items()}
    expected = {(TE, "encoder.layers.0.self_attn.k_proj"): 0.5 * swap[f"{stems[0]}.lora_B.weight"] @ swap[f"{stems[0]}.lora_A.weight"],
                (TR, "final_layer.linear"): 0.5 * swap[f"{stems[1]}.lora_B.weight"] @ swap[f"{stems[1]}.lora_A.weight"]}
    before = weights(pipe)
    pipe.load_lora_weights(swap, adapter_name="x", hotswap=True)
    pipe.fuse_lora(components=[TR, TE])
    after = weights(pipe)
    assert_deltas({k: after[k] - before[k] for k in before if not torch.equal(after[k], before[k])}, expected)
    pipe.unfuse_lora()
    with pytest.raises(ValueError, match="cannot hotswap"):
        pipe.load_lora_weights({k: v for k, v in swap.items() if "text_encoder" not in k}, adapter_name="x",
                               hotswap=True)
