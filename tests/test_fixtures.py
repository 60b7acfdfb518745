"""Tests of the test fixtures themselves: tiny FLUX folders, tokenizers, original-layout writers."""

from __future__ import annotations

import json
import re
import shutil
import time

import pytest
import torch
from safetensors.torch import load_file

from fixtures import (
    TINY_TRANSFORMER_CONFIG,
    diffusers_to_original_autoencoder,
    diffusers_to_original_transformer,
    load_diffusers_state_dict,
    read_model_index,
    tiny_captions,
    write_original_autoencoder_file,
    write_original_transformer_file,
)
from fluxion.data.tokenizers import (
    build_clip_tokenizer,
    build_t5_tokenizer,
    clip_bpe_reference_encode,
    clip_special_ids,
    t5_special_ids,
)

HIDDEN = TINY_TRANSFORMER_CONFIG["num_attention_heads"] * TINY_TRANSFORMER_CONFIG["attention_head_dim"]

CLIP_SAMPLES = [
    "a photo of a red cat on a table",
    "A Painting of   a FLUFFY dragon, at sunset!!",
    "it's 4k: robot_arm #42 (zebra) naïve café 😀",
    "",
]


@pytest.fixture(scope="module")
def dev_pipe(tiny_dev_dir):
    from diffusers import FluxPipeline

    return FluxPipeline.from_pretrained(str(tiny_dev_dir))


@pytest.fixture(scope="module")
def schnell_pipe(tiny_schnell_dir):
    from diffusers import FluxPipeline

    return FluxPipeline.from_pretrained(str(tiny_schnell_dir))


# ------------------------------------------------------------------------------------------
# the pipeline folders
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("flavour", ["dev", "schnell"])
def test_model_index_and_configs(flavour, tiny_dev_dir, tiny_schnell_dir):
    folder = tiny_dev_dir if flavour == "dev" else tiny_schnell_dir
    index = read_model_index(folder)
    assert index["_class_name"] == "FluxPipeline"
    assert index["transformer"] == ["diffusers", "FluxTransformer2DModel"]
    assert index["vae"] == ["diffusers", "AutoencoderKL"]
    assert index["scheduler"] == ["diffusers", "FlowMatchEulerDiscreteScheduler"]
    assert index["text_encoder"] == ["transformers", "CLIPTextModel"]
    assert index["text_encoder_2"] == ["transformers", "T5EncoderModel"]
    assert index["tokenizer"][1] in ("CLIPTokenizer", "CLIPTokenizerFast")
    assert index["tokenizer_2"][1] in ("T5Tokenizer", "T5TokenizerFast")
    for sub in ("transformer", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler"):
        assert (folder / sub).is_dir()
    assert (folder / "tokenizer_2" / "spiece.model").is_file()
    assert (folder / "tokenizer" / "vocab.json").is_file() and (folder / "tokenizer" / "merges.txt").is_file()

    tcfg = json.loads((folder / "transformer" / "config.json").read_text())
    assert tcfg["guidance_embeds"] is (flavour == "dev")
    assert tcfg["in_channels"] == 16 and tcfg["patch_size"] == 1 and list(tcfg["axes_dims_rope"]) == [4, 6, 6]
    vcfg = json.loads((folder / "vae" / "config.json").read_text())
    assert vcfg["latent_channels"] == 4 and len(vcfg["block_out_channels"]) == 2
    assert vcfg["scaling_factor"] == pytest.approx(0.3611) and vcfg["shift_factor"] == pytest.approx(0.1159)
    assert vcfg["use_quant_conv"] is False and vcfg["use_post_quant_conv"] is False
    scfg = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    if flavour == "dev":
        assert scfg["use_dynamic_shifting"] is True and scfg["shift"] == 3.0
        assert (scfg["base_shift"], scfg["max_shift"]) == (0.5, 1.15)
        assert (scfg["base_image_seq_len"], scfg["max_image_seq_len"]) == (256, 4096)
    else:
        assert scfg["use_dynamic_shifting"] is False and scfg["shift"] == 1.0


@pytest.mark.parametrize("flavour", ["dev", "schnell"])
def test_pipeline_runs_two_steps(flavour, dev_pipe, schnell_pipe):
    pipe = dev_pipe if flavour == "dev" else schnell_pipe
    kw = dict(height=32, width=48, num_inference_steps=2, max_sequence_length=64, guidance_scale=3.5)
    img = pipe("a photo of a red cat", generator=torch.Generator().manual_seed(0), output_type="pt", **kw).images
    assert img.shape == (1, 3, 32, 48)
    assert torch.isfinite(img).all()
    assert img.std() > 1e-2
    # not saturated everywhere by the [0, 1] clamp
    assert ((img > 0.001) & (img < 0.999)).float().mean() > 0.2
    lat = pipe("a photo of a red cat", generator=torch.Generator().manual_seed(0), output_type="latent", **kw).images
    assert lat.shape == (1, (32 // 4) * (48 // 4), 16)  # vae_scale_factor 2, 2x2 packing, 4 channels x 4
    assert torch.isfinite(lat).all() and lat.std() > 1e-2
    # prompts matter
    lat2 = pipe("a sketch of a blue robot", generator=torch.Generator().manual_seed(0), output_type="latent", **kw).images
    assert (lat - lat2).abs().max() > 1e-4


def test_dev_guidance_matters_schnell_ignores(dev_pipe, schnell_pipe):
    kw = dict(height=32, width=32, num_inference_steps=1, max_sequence_length=32, output_type="latent")

    def run(pipe, g):
        return pipe("a cat", generator=torch.Generator().manual_seed(0), guidance_scale=g, **kw).images

    assert (run(dev_pipe, 1.0) - run(dev_pipe, 5.0)).abs().max() > 1e-4
    assert torch.equal(run(schnell_pipe, 1.0), run(schnell_pipe, 5.0))


def _component_files(folder):
    return {
        "transformer": folder / "transformer" / "diffusion_pytorch_model.safetensors",
        "vae": folder / "vae" / "diffusion_pytorch_model.safetensors",
        "text_encoder": folder / "text_encoder" / "model.safetensors",
        "text_encoder_2": folder / "text_encoder_2" / "model.safetensors",
    }


@pytest.mark.parametrize("flavour", ["dev", "schnell"])
def test_every_parameter_is_random_float32(flavour, tiny_dev_dir, tiny_schnell_dir):
    folder = tiny_dev_dir if flavour == "dev" else tiny_schnell_dir
    for comp, f in _component_files(folder).items():
        sd = load_file(str(f))
        assert sd, comp
        for k, v in sd.items():
            assert v.dtype == torch.float32, (comp, k, v.dtype)
            assert torch.isfinite(v).all(), (comp, k)
            assert not torch.all(v == 0), f"{comp}:{k} is all zeros"
            assert not torch.all(v == 1), f"{comp}:{k} is all ones"
            if v.numel() > 1:
                assert v.std() > 1e-3, f"{comp}:{k} is (nearly) constant"
    # modulation / final-layer linears that diffusers initialises to zero are non-trivial here
    tsd = load_file(str(_component_files(folder)["transformer"]))
    for k in ("norm_out.linear.weight", "transformer_blocks.0.norm1.linear.weight", "single_transformer_blocks.0.norm.linear.bias"):
        assert tsd[k].abs().mean() > 1e-2, k
    assert ("time_text_embed.guidance_embedder.linear_1.weight" in tsd) is (flavour == "dev")


def test_loaded_pipeline_matches_files(dev_pipe, tiny_dev_dir):
    """Nothing was silently re-initialised on load (every loaded tensor comes from the files)."""
    for comp, f in _component_files(tiny_dev_dir).items():
        file_sd = load_file(str(f))
        model = getattr(dev_pipe, comp)
        model_sd = model.state_dict()
        by_ptr = {v.data_ptr(): k for k, v in model_sd.items() if k in file_sd}
        for k, v in model_sd.items():
            if k in file_sd:
                assert torch.equal(v, file_sd[k]), (comp, k)
            else:  # tied weight (e.g. T5 encoder.embed_tokens <- shared)
                assert v.data_ptr() in by_ptr, f"{comp}:{k} not in the saved file"


def test_clip_pooler_uses_eos_position(dev_pipe):
    tok, enc = dev_pipe.tokenizer, dev_pipe.text_encoder
    bos, eos, pad = clip_special_ids(tok)
    assert enc.config.bos_token_id == bos and enc.config.eos_token_id == eos and enc.config.pad_token_id == pad
    assert eos == enc.config.vocab_size - 1 == len(tok) - 1  # eos is the largest id: argmax rule == first-eos rule
    ids = tok(["a red cat", "a photo of a tiny dragon on the moon"], padding="max_length", max_length=77,
              truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        out = enc(ids)
    pos = (ids == eos).int().argmax(-1)
    assert torch.equal(pos, ids.argmax(-1))
    expected = out.last_hidden_state[torch.arange(2), pos]
    assert torch.allclose(out.pooler_output, expected)
    assert not torch.allclose(out.pooler_output, out.last_hidden_state[:, -1])


# ------------------------------------------------------------------------------------------
# tokenizers
# ------------------------------------------------------------------------------------------


def test_t5_tokenizer_roundtrip(tmp_path):
    import sentencepiece as spm
    from transformers import AutoTokenizer, T5TokenizerFast

    caps = tiny_captions()
    t0 = time.perf_counter()
    tok = build_t5_tokenizer(caps, tmp_path / "t5", vocab_size=200)
    assert time.perf_counter() - t0 < 5.0
    assert t5_special_ids(tok) == (0, 1, 2)
    assert tok.bos_token_id is None
    assert 20 < len(tok) <= 200
    auto = AutoTokenizer.from_pretrained(str(tmp_path / "t5"))
    fast = T5TokenizerFast.from_pretrained(str(tmp_path / "t5"))
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "t5" / "spiece.model"))
    assert sp.get_piece_size() == len(tok) == len(auto)
    assert [sp.id_to_piece(i) for i in range(3)] == ["<pad>", "</s>", "<unk>"]
    for text in caps[:8] + ["A Painting of a dragon!", "zzz qqq"]:
        ids = tok(text).input_ids
        assert ids == auto(text).input_ids == fast(text).input_ids == sp.encode(text) + [1]
        assert ids[-1] == 1 and 0 not in ids
    for text in caps[:8]:
        assert tok.decode(tok(text).input_ids, skip_special_tokens=True) == text
    padded = tok(caps[0], padding="max_length", max_length=64, truncation=True).input_ids
    assert len(padded) == 64 and padded[-1] == 0


def test_t5_tokenizer_small_corpus_lowers_vocab(tmp_path):
    tok = build_t5_tokenizer(["a cat", "a dog", "a red cat on a mat"], tmp_path / "t5", vocab_size=200)
    assert 4 < len(tok) < 200
    assert tok("a cat").input_ids[-1] == 1


def test_clip_tokenizer_slow_fast_reference_agree(tmp_path):
    from transformers import AutoTokenizer, CLIPTokenizer, CLIPTokenizerFast

    words = ["photo", "painting", "cat", "dragon", "fluffy", "at", "a", "sunset", "cathedral", "catalog"]
    out = tmp_path / "clip"
    tok = build_clip_tokenizer(out, words=words)
    slow = CLIPTokenizer.from_pretrained(str(out))
    fast = CLIPTokenizerFast.from_pretrained(str(out))
    auto = AutoTokenizer.from_pretrained(str(out))
    vocab = json.loads((out / "vocab.json").read_text(encoding="utf-8"))
    lines = (out / "merges.txt").read_text(encoding="utf-8").splitlines()
    assert lines[0].startswith("#version")
    merges = [tuple(line.split()) for line in lines[1:] if line]

    # classic files only (no tokenizer.json): must tokenise the same
    classic = tmp_path / "classic"
    classic.mkdir()
    for n in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        shutil.copy(out / n, classic / n)
    from_classic = CLIPTokenizer.from_pretrained(str(classic))

    for text in CLIP_SAMPLES:
        ref = clip_bpe_reference_encode(text, vocab, merges)
        for t in (tok, slow, fast, auto, from_classic):
            assert t(text).input_ids == ref, (type(t).__name__, text)

    bos, eos, pad = clip_special_ids(tok)
    assert (bos, eos) == (len(vocab) - 2, len(vocab) - 1)
    assert pad == eos and tok.pad_token == "<|endoftext|>" and tok.bos_token == "<|startoftext|>"
    assert len(tok) == len(vocab) == 512 + len(merges) + 2
    assert tok.model_max_length == 77
    for w in words:
        assert tok(w, add_special_tokens=False).input_ids == [vocab[w + "</w>"]], w
        assert tok(w.upper(), add_special_tokens=False).input_ids == [vocab[w + "</w>"]], w
    ids = tok("a fluffy cat", padding="max_length", max_length=77, truncation=True).input_ids
    assert len(ids) == 77 and ids[:5] == [bos, vocab["a</w>"], vocab["fluffy</w>"], vocab["cat</w>"], eos]
    assert ids[5:] == [pad] * 72
    assert tok.decode(tok("a fluffy cat at sunset").input_ids, skip_special_tokens=True) == "a fluffy cat at sunset"


def test_clip_tokenizer_without_words_is_byte_level(tmp_path):
    tok = build_clip_tokenizer(tmp_path / "clip")
    assert len(tok) == 514
    ids = tok("cat", add_special_tokens=False).input_ids
    assert len(ids) == 3  # c, a, t</w>
    assert tok.decode(tok("hello wörld 😀").input_ids, skip_special_tokens=True) == "hello wörld 😀"


def test_pipeline_tokenizers(dev_pipe):
    assert dev_pipe.tokenizer_max_length == 77
    assert dev_pipe.text_encoder.config.vocab_size == len(dev_pipe.tokenizer)
    assert dev_pipe.text_encoder_2.config.vocab_size == len(dev_pipe.tokenizer_2)
    # caption words are single CLIP tokens
    ids = dev_pipe.tokenizer("a photo of a red cat", add_special_tokens=False).input_ids
    assert len(ids) == 6


# ------------------------------------------------------------------------------------------
# original-layout writers
# ------------------------------------------------------------------------------------------


def _numel(sd):
    return sum(v.numel() for v in sd.values())


def test_original_transformer_layout(tiny_dev_original_files, tiny_dev_dir):
    tfile, _ = tiny_dev_original_files
    orig = load_file(str(tfile))
    dif = load_diffusers_state_dict(tiny_dev_dir, "transformer")
    assert _numel(orig) == _numel(dif)
    assert not any(k.startswith(("transformer_blocks", "single_transformer_blocks", "x_embedder", "norm_out")) for k in orig)
    h = HIDDEN
    expect = {
        "img_in.weight": (h, 16),
        "txt_in.weight": (h, 32),
        "time_in.in_layer.weight": (h, 256),
        "time_in.out_layer.weight": (h, h),
        "guidance_in.in_layer.weight": (h, 256),
        "vector_in.in_layer.weight": (h, 32),
        "double_blocks.0.img_attn.qkv.weight": (3 * h, h),
        "double_blocks.0.img_attn.qkv.bias": (3 * h,),
        "double_blocks.1.txt_attn.qkv.weight": (3 * h, h),
        "double_blocks.0.img_attn.norm.query_norm.scale": (16,),
        "double_blocks.0.txt_attn.norm.key_norm.scale": (16,),
        "double_blocks.0.img_attn.proj.weight": (h, h),
        "double_blocks.0.txt_attn.proj.weight": (h, h),
        "double_blocks.0.img_mod.lin.weight": (6 * h, h),
        "double_blocks.0.txt_mod.lin.weight": (6 * h, h),
        "double_blocks.0.img_mlp.0.weight": (4 * h, h),
        "double_blocks.0.img_mlp.2.weight": (h, 4 * h),
        "double_blocks.0.txt_mlp.0.weight": (4 * h, h),
        "single_blocks.0.linear1.weight": (3 * h + 4 * h, h),
        "single_blocks.0.linear1.bias": (3 * h + 4 * h,),
        "single_blocks.1.linear2.weight": (h, h + 4 * h),
        "single_blocks.0.modulation.lin.weight": (3 * h, h),
        "single_blocks.0.norm.query_norm.scale": (16,),
        "final_layer.adaLN_modulation.1.weight": (2 * h, h),
        "final_layer.adaLN_modulation.1.bias": (2 * h,),
        "final_layer.linear.weight": (16, h),
    }
    for k, shape in expect.items():
        assert k in orig, k
        assert tuple(orig[k].shape) == shape, (k, tuple(orig[k].shape))
    # values
    q, k_, v = orig["double_blocks.0.img_attn.qkv.weight"].chunk(3)
    assert torch.equal(q, dif["transformer_blocks.0.attn.to_q.weight"])
    assert torch.equal(k_, dif["transformer_blocks.0.attn.to_k.weight"])
    assert torch.equal(v, dif["transformer_blocks.0.attn.to_v.weight"])
    assert torch.equal(orig["double_blocks.0.txt_attn.qkv.bias"][:h], dif["transformer_blocks.0.attn.add_q_proj.bias"])
    l1 = orig["single_blocks.1.linear1.weight"]
    assert torch.equal(l1[2 * h : 3 * h], dif["single_transformer_blocks.1.attn.to_v.weight"])
    assert torch.equal(l1[3 * h :], dif["single_transformer_blocks.1.proj_mlp.weight"])
    shift, scale = orig["final_layer.adaLN_modulation.1.weight"].chunk(2)
    d_scale, d_shift = dif["norm_out.linear.weight"].chunk(2)
    assert torch.equal(shift, d_shift) and torch.equal(scale, d_scale)
    assert not torch.equal(shift, scale)


def test_original_schnell_has_no_guidance(tiny_schnell_original_files):
    tfile, _ = tiny_schnell_original_files
    orig = load_file(str(tfile))
    assert not any(k.startswith("guidance_in") for k in orig)
    assert "img_in.weight" in orig


def test_original_transformer_prefix(tiny_dev_dir, tmp_path):
    f = write_original_transformer_file(tiny_dev_dir / "transformer", tmp_path / "t.safetensors", prefix="model.diffusion_model.")
    sd = load_file(str(f))
    assert all(k.startswith("model.diffusion_model.") for k in sd)
    assert "model.diffusion_model.double_blocks.0.img_attn.qkv.weight" in sd


def test_original_transformer_matches_diffusers_own_converter(tiny_dev_dir, monkeypatch):
    """diffusers' single-file converter (original -> diffusers) inverts our writer exactly.

    It hard-codes FLUX's hidden size (3072) when splitting ``linear1``; the split sizes are
    rescaled to the tiny model through a thin proxy around ``torch``.
    """
    from diffusers.loaders import single_file_utils as sfu

    h = HIDDEN

    class _TorchProxy:
        def __getattr__(self, name):
            return getattr(torch, name)

        def split(self, t, sizes, dim=0):
            if isinstance(sizes, (tuple, list)) and tuple(sizes) == (3072, 3072, 3072, 12288):
                sizes = (h, h, h, 4 * h)
            return torch.split(t, sizes, dim=dim)

    dif = load_diffusers_state_dict(tiny_dev_dir, "transformer")
    orig = diffusers_to_original_transformer(dif)
    monkeypatch.setattr(sfu, "torch", _TorchProxy())
    back = sfu.convert_flux_transformer_checkpoint_to_diffusers({"model.diffusion_model." + k: v for k, v in orig.items()})
    monkeypatch.undo()
    assert set(back) == set(dif)
    for k in dif:
        assert torch.equal(back[k], dif[k]), k


def test_original_autoencoder_layout(tiny_dev_original_files, tiny_dev_dir):
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    _, aefile = tiny_dev_original_files
    orig = load_file(str(aefile))
    dif = load_diffusers_state_dict(tiny_dev_dir, "vae")
    assert _numel(orig) == _numel(dif) and len(orig) == len(dif)
    for k in ("encoder.mid.attn_1.q.weight", "encoder.mid.attn_1.proj_out.weight", "decoder.mid.attn_1.v.weight"):
        assert orig[k].ndim == 4 and orig[k].shape[2:] == (1, 1), k
    for k in (
        "encoder.conv_in.weight", "encoder.down.0.block.0.conv1.weight", "encoder.down.0.downsample.conv.weight",
        "encoder.down.1.block.0.nin_shortcut.weight", "encoder.mid.block_1.norm1.weight", "encoder.mid.block_2.conv2.bias",
        "encoder.mid.attn_1.norm.weight", "encoder.norm_out.weight", "encoder.conv_out.weight",
        "decoder.conv_in.weight", "decoder.mid.block_1.conv1.weight", "decoder.up.0.block.0.conv1.weight",
        "decoder.up.0.block.1.conv1.weight",
        "decoder.up.1.upsample.conv.weight", "decoder.norm_out.weight", "decoder.conv_out.weight",
    ):
        assert k in orig, k
    assert not any(k.startswith("decoder.up.0.upsample") for k in orig)  # level 0 has no upsample
    assert not any(k.startswith("encoder.down.1.downsample") for k in orig)  # last level has no downsample
    assert not any("quant_conv" in k for k in orig)
    # decoder up-block index reversal: original up.0 (no upsample, 32->16 channels) == diffusers up_blocks.1
    assert torch.equal(orig["decoder.up.0.block.0.conv1.weight"], dif["decoder.up_blocks.1.resnets.0.conv1.weight"])
    assert torch.equal(orig["decoder.up.1.upsample.conv.weight"], dif["decoder.up_blocks.0.upsamplers.0.conv.weight"])
    assert torch.equal(orig["encoder.mid.attn_1.q.weight"][:, :, 0, 0], dif["encoder.mid_block.attentions.0.to_q.weight"])
    # diffusers' own LDM->diffusers VAE converter inverts our writer exactly
    cfg = json.loads((tiny_dev_dir / "vae" / "config.json").read_text())
    back = convert_ldm_vae_checkpoint(dict(orig), cfg)
    assert set(back) == set(dif)
    for k in dif:
        assert torch.equal(back[k], dif[k]), k


def test_converters_are_strict():
    with pytest.raises(KeyError):
        diffusers_to_original_transformer({"x_embedder.weight": torch.zeros(2, 2), "bogus.weight": torch.zeros(1)})
    with pytest.raises(KeyError):
        diffusers_to_original_autoencoder({"encoder.bogus.weight": torch.zeros(1)})


def test_writers_accept_modules_and_state_dicts(dev_pipe, tmp_path):
    f1 = write_original_transformer_file(dev_pipe.transformer, tmp_path / "a.safetensors")
    f2 = write_original_autoencoder_file(dev_pipe.vae.state_dict(), tmp_path / "ae.safetensors")
    a, b = load_file(str(f1)), load_file(str(f2))
    assert "double_blocks.1.img_attn.qkv.weight" in a and "decoder.up.1.upsample.conv.weight" in b
    assert all(re.fullmatch(r"[A-Za-z_0-9.]+", k) for k in list(a) + list(b))
