"""Test helpers (not tests): tiny random FLUX checkpoints built with diffusers.

diffusers is the test-only oracle: the folders made here are genuine diffusers
``FluxPipeline`` folders (``save_pretrained``), and the writers below convert the
diffusers transformer / VAE weights to the ORIGINAL Black Forest Labs layout
(``flux1-*.safetensors`` / ``ae.safetensors`` keys), written independently from
fluxion's own loaders (see /work/shared/reference/flux-spec.md sections 3-4).

Public helpers:

* ``make_tiny_flux_folder(path, guidance_embeds, seed=0, transformer_overrides=None) -> Path``
* ``randomize_parameters_(module, seed)``
* ``diffusers_to_original_transformer(state_dict) -> dict``
* ``diffusers_to_original_autoencoder(state_dict) -> dict``
* ``write_original_transformer_file(src, out_file, prefix="") -> Path``
* ``write_original_autoencoder_file(src, out_file, prefix="") -> Path``
* ``load_diffusers_state_dict(src, subfolder) -> dict``
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path

import torch

from fluxion.data.tokenizers import (
    build_clip_tokenizer,
    build_t5_tokenizer,
    clip_special_ids,
    default_captions,
)

__all__ = [
    "TINY_TRANSFORMER_CONFIG",
    "TINY_VAE_CONFIG",
    "TINY_T5_CONFIG",
    "TINY_CLIP_CONFIG",
    "DEV_SCHEDULER_CONFIG",
    "SCHNELL_SCHEDULER_CONFIG",
    "tiny_captions",
    "randomize_parameters_",
    "make_tiny_flux_folder",
    "load_diffusers_state_dict",
    "diffusers_to_original_transformer",
    "diffusers_to_original_autoencoder",
    "write_original_transformer_file",
    "write_original_autoencoder_file",
    "read_model_index",
]

# ----------------------------------------------------------------------------------------
# tiny configurations
# ----------------------------------------------------------------------------------------

#: diffusers FluxTransformer2DModel kwargs (guidance_embeds is added per folder).
#: hidden = 2 heads x 16 = 32; RoPE axes 4+6+6 = 16 = head_dim; in_channels 16 = 4 latent ch x 2x2.
TINY_TRANSFORMER_CONFIG = dict(
    patch_size=1,
    in_channels=16,
    out_channels=None,
    num_layers=2,
    num_single_layers=2,
    attention_head_dim=16,
    num_attention_heads=2,
    joint_attention_dim=32,
    pooled_projection_dim=32,
    axes_dims_rope=(4, 6, 6),
)

#: diffusers AutoencoderKL kwargs: 2 levels -> vae_scale_factor 2, 4 latent channels.
TINY_VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
    up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
    block_out_channels=(16, 32),
    layers_per_block=1,
    act_fn="silu",
    latent_channels=4,
    norm_num_groups=8,
    sample_size=32,
    scaling_factor=0.3611,
    shift_factor=0.1159,
    use_quant_conv=False,
    use_post_quant_conv=False,
    force_upcast=True,
    mid_block_add_attention=True,
)

#: transformers T5Config kwargs (vocab_size / special ids come from the tokenizer).
TINY_T5_CONFIG = dict(
    d_model=32,
    d_kv=16,
    d_ff=37,
    num_layers=2,
    num_decoder_layers=2,
    num_heads=2,
    relative_attention_num_buckets=32,
    relative_attention_max_distance=128,
    dropout_rate=0.0,
    layer_norm_epsilon=1e-6,
    feed_forward_proj="gated-gelu",
    is_encoder_decoder=True,
    tie_word_embeddings=False,
)

#: transformers CLIPTextConfig kwargs (vocab_size / bos / eos / pad come from the tokenizer).
TINY_CLIP_CONFIG = dict(
    hidden_size=32,
    intermediate_size=37,
    projection_dim=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
    layer_norm_eps=1e-5,
    attention_dropout=0.0,
)

#: FlowMatchEulerDiscreteScheduler configs as in the real FLUX.1 folders.
DEV_SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    shift=3.0,
    use_dynamic_shifting=True,
    base_shift=0.5,
    max_shift=1.15,
    base_image_seq_len=256,
    max_image_seq_len=4096,
)
SCHNELL_SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    shift=1.0,
    use_dynamic_shifting=False,
    base_shift=0.5,
    max_shift=1.15,
    base_image_seq_len=256,
    max_image_seq_len=4096,
)


def tiny_captions(n: int = 48, seed: int = 0) -> list[str]:
    """The caption corpus the tiny tokenizers are trained on."""
    return default_captions(n, seed)


def _caption_words(captions) -> list[str]:
    return sorted({w for c in captions for w in re.findall(r"[a-z]+", c.lower())})


# ----------------------------------------------------------------------------------------
# randomisation
# ----------------------------------------------------------------------------------------


@torch.no_grad()
def randomize_parameters_(module: torch.nn.Module, seed: int | None = None, bias_std: float = 0.1) -> torch.nn.Module:
    """Give EVERY parameter a non-trivial random value (in place).

    * parameters of normalisation modules (LayerNorm, GroupNorm, RMSNorm, T5LayerNorm ...):
      weight/scale ``1 + 0.1*randn``, bias ``0.1*randn``;
    * other 1-D parameters (biases): ``bias_std * randn``;
    * >= 2-D parameters (linear / conv weights, embeddings): ``randn / sqrt(fan_in)`` with
      ``fan_in = numel / shape[0]``, so activations stay O(1) (softmax attention is not
      uniform, modulation / gates are O(1) instead of zero as diffusers initialises them).
    """
    gen = torch.Generator().manual_seed(int(seed)) if seed is not None else None
    seen: set[int] = set()
    for _, mod in module.named_modules():
        is_norm = "norm" in type(mod).__name__.lower()
        for name, p in mod.named_parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
            if is_norm and p.ndim == 1:
                val = (1.0 + 0.1 * noise) if name in ("weight", "scale") else 0.1 * noise
            elif p.ndim <= 1:
                val = bias_std * noise
            else:
                fan_in = max(1, p.numel() // p.shape[0])
                val = noise / fan_in**0.5
            p.copy_(val.to(p.dtype))
    return module


# ----------------------------------------------------------------------------------------
# tiny pipeline folder
# ----------------------------------------------------------------------------------------


def make_tiny_flux_folder(
    path, guidance_embeds: bool, seed: int = 0, transformer_overrides: dict | None = None
) -> Path:
    """Build a tiny, fully random diffusers ``FluxPipeline`` folder at ``path`` (float32).

    ``guidance_embeds=True`` gives a "dev" folder (guidance embedder, dynamic-shift
    scheduler), ``False`` a "schnell" one (no guidance embedder, shift 1.0).
    ``transformer_overrides`` replace entries of ``TINY_TRANSFORMER_CONFIG`` (e.g.
    ``in_channels=48, out_channels=16`` for a Fill-layout model, ``32, 16`` for a Control one).
    """
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tok_tmp = path / "_tokenizers_build"

    captions = tiny_captions()
    tokenizer_2 = build_t5_tokenizer(captions, tok_tmp / "t5", vocab_size=200)
    tokenizer = build_clip_tokenizer(tok_tmp / "clip", words=_caption_words(captions), model_max_length=77)
    bos_id, eos_id, pad_id = clip_special_ids(tokenizer)

    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        guidance_embeds=guidance_embeds, **{**TINY_TRANSFORMER_CONFIG, **(transformer_overrides or {})}
    )
    vae = AutoencoderKL(**TINY_VAE_CONFIG)
    t5_config = T5Config(
        vocab_size=len(tokenizer_2),
        pad_token_id=tokenizer_2.pad_token_id,
        eos_token_id=tokenizer_2.eos_token_id,
        decoder_start_token_id=tokenizer_2.pad_token_id,
        **TINY_T5_CONFIG,
    )
    text_encoder_2 = T5EncoderModel(t5_config)
    clip_config = CLIPTextConfig(
        vocab_size=len(tokenizer), bos_token_id=bos_id, eos_token_id=eos_id, pad_token_id=pad_id, **TINY_CLIP_CONFIG
    )
    text_encoder = CLIPTextModel(clip_config)

    for i, m in enumerate((transformer, vae, text_encoder, text_encoder_2)):
        if any(p.dtype != torch.float32 for p in m.parameters()):
            m.to(torch.float32)
        randomize_parameters_(m, seed=seed * 1000 + i)
        m.eval()

    sched_cfg = DEV_SCHEDULER_CONFIG if guidance_embeds else SCHNELL_SCHEDULER_CONFIG
    scheduler = FlowMatchEulerDiscreteScheduler(**sched_cfg)

    pipe = FluxPipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        transformer=transformer,
    )
    pipe.save_pretrained(str(path), safe_serialization=True)
    # keep the raw files the tokenizers were built from next to what save_pretrained wrote
    # (spiece.model for T5; vocab.json + merges.txt for CLIP)
    for sub, names in (("tokenizer_2", ["spiece.model"]), ("tokenizer", ["vocab.json", "merges.txt"])):
        src_dir = tok_tmp / ("t5" if sub == "tokenizer_2" else "clip")
        for n in names:
            dst = path / sub / n
            if not dst.exists():
                dst.write_bytes((src_dir / n).read_bytes())
    _rmtree(tok_tmp)
    return path


def _rmtree(p: Path) -> None:
    import shutil

    shutil.rmtree(p, ignore_errors=True)


# ----------------------------------------------------------------------------------------
# loading diffusers weights
# ----------------------------------------------------------------------------------------


def load_diffusers_state_dict(src, subfolder: str) -> dict[str, torch.Tensor]:
    """A diffusers state dict from: a mapping, an ``nn.Module``, a ``.safetensors`` file,
    a model folder (``diffusion_pytorch_model*.safetensors``, sharded or not) or a pipeline
    folder containing ``subfolder`` (``"transformer"`` / ``"vae"``)."""
    from safetensors.torch import load_file

    if isinstance(src, torch.nn.Module):
        return {k: v.detach() for k, v in src.state_dict().items()}
    if isinstance(src, Mapping):
        return dict(src)
    p = Path(src)
    if p.is_file():
        return load_file(str(p))
    if (p / subfolder).is_dir():
        p = p / subfolder
    files = sorted(p.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no .safetensors files in {p}")
    sd: dict[str, torch.Tensor] = {}
    for f in files:
        sd.update(load_file(str(f)))
    return sd


def _save(sd: dict[str, torch.Tensor], out_file, prefix: str) -> Path:
    from safetensors.torch import save_file

    out_file = Path(out_file)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    save_file({prefix + k: v.detach().contiguous().clone() for k, v in sd.items()}, str(out_file))
    return out_file


# ----------------------------------------------------------------------------------------
# transformer: diffusers -> original (BFL) layout
# ----------------------------------------------------------------------------------------

_TF_RENAMES = [
    # (diffusers regex, original template)
    (r"x_embedder\.(weight|bias)", r"img_in.\1"),
    (r"context_embedder\.(weight|bias)", r"txt_in.\1"),
    (r"time_text_embed\.timestep_embedder\.linear_1\.(weight|bias)", r"time_in.in_layer.\1"),
    (r"time_text_embed\.timestep_embedder\.linear_2\.(weight|bias)", r"time_in.out_layer.\1"),
    (r"time_text_embed\.guidance_embedder\.linear_1\.(weight|bias)", r"guidance_in.in_layer.\1"),
    (r"time_text_embed\.guidance_embedder\.linear_2\.(weight|bias)", r"guidance_in.out_layer.\1"),
    (r"time_text_embed\.text_embedder\.linear_1\.(weight|bias)", r"vector_in.in_layer.\1"),
    (r"time_text_embed\.text_embedder\.linear_2\.(weight|bias)", r"vector_in.out_layer.\1"),
    # double blocks
    (r"transformer_blocks\.(\d+)\.norm1\.linear\.(weight|bias)", r"double_blocks.\1.img_mod.lin.\2"),
    (r"transformer_blocks\.(\d+)\.norm1_context\.linear\.(weight|bias)", r"double_blocks.\1.txt_mod.lin.\2"),
    (r"transformer_blocks\.(\d+)\.attn\.norm_q\.weight", r"double_blocks.\1.img_attn.norm.query_norm.scale"),
    (r"transformer_blocks\.(\d+)\.attn\.norm_k\.weight", r"double_blocks.\1.img_attn.norm.key_norm.scale"),
    (r"transformer_blocks\.(\d+)\.attn\.norm_added_q\.weight", r"double_blocks.\1.txt_attn.norm.query_norm.scale"),
    (r"transformer_blocks\.(\d+)\.attn\.norm_added_k\.weight", r"double_blocks.\1.txt_attn.norm.key_norm.scale"),
    (r"transformer_blocks\.(\d+)\.attn\.to_out\.0\.(weight|bias)", r"double_blocks.\1.img_attn.proj.\2"),
    (r"transformer_blocks\.(\d+)\.attn\.to_add_out\.(weight|bias)", r"double_blocks.\1.txt_attn.proj.\2"),
    (r"transformer_blocks\.(\d+)\.ff\.net\.0\.proj\.(weight|bias)", r"double_blocks.\1.img_mlp.0.\2"),
    (r"transformer_blocks\.(\d+)\.ff\.net\.2\.(weight|bias)", r"double_blocks.\1.img_mlp.2.\2"),
    (r"transformer_blocks\.(\d+)\.ff_context\.net\.0\.proj\.(weight|bias)", r"double_blocks.\1.txt_mlp.0.\2"),
    (r"transformer_blocks\.(\d+)\.ff_context\.net\.2\.(weight|bias)", r"double_blocks.\1.txt_mlp.2.\2"),
    # single blocks
    (r"single_transformer_blocks\.(\d+)\.norm\.linear\.(weight|bias)", r"single_blocks.\1.modulation.lin.\2"),
    (r"single_transformer_blocks\.(\d+)\.attn\.norm_q\.weight", r"single_blocks.\1.norm.query_norm.scale"),
    (r"single_transformer_blocks\.(\d+)\.attn\.norm_k\.weight", r"single_blocks.\1.norm.key_norm.scale"),
    (r"single_transformer_blocks\.(\d+)\.proj_out\.(weight|bias)", r"single_blocks.\1.linear2.\2"),
    # final layer (norm_out.linear handled separately: halves swapped)
    (r"proj_out\.(weight|bias)", r"final_layer.linear.\1"),
]


def diffusers_to_original_transformer(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Convert a diffusers ``FluxTransformer2DModel`` state dict to the original BFL key layout.

    Strict: raises ``KeyError`` if any diffusers key is left unconverted.
    """
    sd = dict(state_dict)
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()

    def take(k: str) -> torch.Tensor:
        used.add(k)
        return sd[k]

    double_ids = sorted({int(m.group(1)) for k in sd if (m := re.match(r"transformer_blocks\.(\d+)\.", k))})
    single_ids = sorted({int(m.group(1)) for k in sd if (m := re.match(r"single_transformer_blocks\.(\d+)\.", k))})

    for i in double_ids:
        p = f"transformer_blocks.{i}.attn."
        for wb in ("weight", "bias"):
            out[f"double_blocks.{i}.img_attn.qkv.{wb}"] = torch.cat(
                [take(p + f"to_{x}.{wb}") for x in ("q", "k", "v")], dim=0
            )
            out[f"double_blocks.{i}.txt_attn.qkv.{wb}"] = torch.cat(
                [take(p + f"add_{x}_proj.{wb}") for x in ("q", "k", "v")], dim=0
            )
    for i in single_ids:
        p = f"single_transformer_blocks.{i}."
        for wb in ("weight", "bias"):
            out[f"single_blocks.{i}.linear1.{wb}"] = torch.cat(
                [take(p + f"attn.to_{x}.{wb}") for x in ("q", "k", "v")] + [take(p + f"proj_mlp.{wb}")], dim=0
            )
    for wb in ("weight", "bias"):
        scale, shift = take(f"norm_out.linear.{wb}").chunk(2, dim=0)  # diffusers: scale first
        out[f"final_layer.adaLN_modulation.1.{wb}"] = torch.cat([shift, scale], dim=0)  # original: shift first

    for k, v in sd.items():
        if k in used:
            continue
        for pat, repl in _TF_RENAMES:
            if re.fullmatch(pat, k):
                out[re.sub(pat, repl, k)] = v
                used.add(k)
                break
    left = [k for k in sd if k not in used]
    if left:
        raise KeyError(f"unconverted diffusers transformer keys: {left[:10]}{' ...' if len(left) > 10 else ''}")
    return out


def write_original_transformer_file(diffusers_transformer_folder_or_state_dict, out_file, prefix: str = "") -> Path:
    """Write the diffusers FLUX transformer weights as an original-layout ``.safetensors`` file.

    ``prefix`` (e.g. ``"model.diffusion_model."``) is prepended to every key.
    """
    sd = load_diffusers_state_dict(diffusers_transformer_folder_or_state_dict, "transformer")
    return _save(diffusers_to_original_transformer(sd), out_file, prefix)


# ----------------------------------------------------------------------------------------
# autoencoder: diffusers -> original (ae.safetensors) layout
# ----------------------------------------------------------------------------------------

_RESNET_RENAMES = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2", "conv_shortcut": "nin_shortcut"}
_ATTN_RENAMES = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def diffusers_to_original_autoencoder(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Convert a diffusers ``AutoencoderKL`` state dict to the original FLUX ``ae.safetensors`` layout.

    Attention projections (Linear in diffusers) become 1x1 convs ``[C, C, 1, 1]``; decoder
    ``up_blocks.k`` becomes ``up.(n_levels-1-k)``. Strict: raises on unconverted keys.
    """
    sd = dict(state_dict)
    n_up = 1 + max((int(m.group(1)) for k in sd if (m := re.match(r"decoder\.up_blocks\.(\d+)\.", k))), default=-1)
    out: dict[str, torch.Tensor] = {}
    left = []
    res_alt = "|".join(re.escape(x) for x in _RESNET_RENAMES)
    attn_alt = "|".join(re.escape(x) for x in _ATTN_RENAMES)
    for k, v in sd.items():
        new = None
        m = re.fullmatch(r"(encoder|decoder)\.(conv_in|conv_out)\.(weight|bias)", k)
        if m:
            new = k
        elif m := re.fullmatch(r"(encoder|decoder)\.conv_norm_out\.(weight|bias)", k):
            new = f"{m.group(1)}.norm_out.{m.group(2)}"
        elif m := re.fullmatch(r"(quant_conv|post_quant_conv)\.(weight|bias)", k):
            new = k
        elif m := re.fullmatch(rf"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.({res_alt})\.(weight|bias)", k):
            new = f"encoder.down.{m.group(1)}.block.{m.group(2)}.{_RESNET_RENAMES[m.group(3)]}.{m.group(4)}"
        elif m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(weight|bias)", k):
            new = f"encoder.down.{m.group(1)}.downsample.conv.{m.group(2)}"
        elif m := re.fullmatch(rf"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.({res_alt})\.(weight|bias)", k):
            level = n_up - 1 - int(m.group(1))
            new = f"decoder.up.{level}.block.{m.group(2)}.{_RESNET_RENAMES[m.group(3)]}.{m.group(4)}"
        elif m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(weight|bias)", k):
            level = n_up - 1 - int(m.group(1))
            new = f"decoder.up.{level}.upsample.conv.{m.group(2)}"
        elif m := re.fullmatch(rf"(encoder|decoder)\.mid_block\.resnets\.([01])\.({res_alt})\.(weight|bias)", k):
            new = f"{m.group(1)}.mid.block_{int(m.group(2)) + 1}.{_RESNET_RENAMES[m.group(3)]}.{m.group(4)}"
        elif m := re.fullmatch(rf"(encoder|decoder)\.mid_block\.attentions\.0\.({attn_alt})\.(weight|bias)", k):
            new = f"{m.group(1)}.mid.attn_1.{_ATTN_RENAMES[m.group(2)]}.{m.group(3)}"
            if m.group(2) != "group_norm" and m.group(3) == "weight" and v.ndim == 2:
                v = v[:, :, None, None]  # Linear [C_out, C_in] -> 1x1 conv [C_out, C_in, 1, 1]
        if new is None:
            left.append(k)
        else:
            out[new] = v
    if left:
        raise KeyError(f"unconverted diffusers VAE keys: {left[:10]}{' ...' if len(left) > 10 else ''}")
    return out


def write_original_autoencoder_file(diffusers_vae_folder_or_state_dict, out_file, prefix: str = "") -> Path:
    """Write the diffusers FLUX VAE weights as an original-layout ``ae.safetensors`` file."""
    sd = load_diffusers_state_dict(diffusers_vae_folder_or_state_dict, "vae")
    return _save(diffusers_to_original_autoencoder(sd), out_file, prefix)


def read_model_index(folder) -> dict:
    """The parsed ``model_index.json`` of a pipeline folder."""
    with open(os.path.join(folder, "model_index.json")) as f:
        return json.load(f)
