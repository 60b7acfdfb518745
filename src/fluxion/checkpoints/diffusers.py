"""The diffusers folder layout (transformer/, vae/): key maps to our (original) names, configs from config.json."""
from __future__ import annotations

import json
from pathlib import Path

from ..files import atomic_path
from ..model.autoencoder import AutoEncoderConfig
from ..model.transformer import FluxConfig
from .loading import Recipe, TensorStore
from .safetensors_file import CheckpointError

# ---------------------------------------------------------------- transformer


def transformer_module_map(depth: int, depth_single: int, guidance_embed: bool) -> dict[str, tuple[tuple[str, ...], str]]:
    """Original module -> (diffusers modules, how they combine). Shared with the LoRA loaders."""
    m: dict[str, tuple[tuple[str, ...], str]] = {
        "img_in": (("x_embedder",), "same"),
        "txt_in": (("context_embedder",), "same"),
        "time_in.in_layer": (("time_text_embed.timestep_embedder.linear_1",), "same"),
        "time_in.out_layer": (("time_text_embed.timestep_embedder.linear_2",), "same"),
        "vector_in.in_layer": (("time_text_embed.text_embedder.linear_1",), "same"),
        "vector_in.out_layer": (("time_text_embed.text_embedder.linear_2",), "same"),
        "final_layer.linear": (("proj_out",), "same"),
        "final_layer.adaLN_modulation.1": (("norm_out.linear",), "swap_halves"),
    }
    if guidance_embed:
        m["guidance_in.in_layer"] = (("time_text_embed.guidance_embedder.linear_1",), "same")
        m["guidance_in.out_layer"] = (("time_text_embed.guidance_embedder.linear_2",), "same")
    for i in range(depth):
        o, d = f"double_blocks.{i}", f"transformer_blocks.{i}"
        m |= {
            f"{o}.img_mod.lin": ((f"{d}.norm1.linear",), "same"),
            f"{o}.txt_mod.lin": ((f"{d}.norm1_context.linear",), "same"),
            f"{o}.img_attn.qkv": ((f"{d}.attn.to_q", f"{d}.attn.to_k", f"{d}.attn.to_v"), "cat"),
            f"{o}.txt_attn.qkv": ((f"{d}.attn.add_q_proj", f"{d}.attn.add_k_proj", f"{d}.attn.add_v_proj"), "cat"),
            f"{o}.img_attn.norm.query_norm": ((f"{d}.attn.norm_q",), "same"),
            f"{o}.img_attn.norm.key_norm": ((f"{d}.attn.norm_k",), "same"),
            f"{o}.txt_attn.norm.query_norm": ((f"{d}.attn.norm_added_q",), "same"),
            f"{o}.txt_attn.norm.key_norm": ((f"{d}.attn.norm_added_k",), "same"),
            f"{o}.img_attn.proj": ((f"{d}.attn.to_out.0",), "same"),
            f"{o}.txt_attn.proj": ((f"{d}.attn.to_add_out",), "same"),
            f"{o}.img_mlp.0": ((f"{d}.ff.net.0.proj",), "same"),
            f"{o}.img_mlp.2": ((f"{d}.ff.net.2",), "same"),
            f"{o}.txt_mlp.0": ((f"{d}.ff_context.net.0.proj",), "same"),
            f"{o}.txt_mlp.2": ((f"{d}.ff_context.net.2",), "same"),
        }
    for i in range(depth_single):
        o, d = f"single_blocks.{i}", f"single_transformer_blocks.{i}"
        m |= {
            f"{o}.linear1": ((f"{d}.attn.to_q", f"{d}.attn.to_k", f"{d}.attn.to_v", f"{d}.proj_mlp"), "cat"),
            f"{o}.linear2": ((f"{d}.proj_out",), "same"),
            f"{o}.norm.query_norm": ((f"{d}.attn.norm_q",), "same"),
            f"{o}.norm.key_norm": ((f"{d}.attn.norm_k",), "same"),
            f"{o}.modulation.lin": ((f"{d}.norm.linear",), "same"),
        }
    return m


def transformer_recipes(config: FluxConfig, store: TensorStore) -> dict[str, Recipe]:
    recipes = {}
    for orig, (sources, combine) in transformer_module_map(
        config.depth, config.depth_single_blocks, config.guidance_embed
    ).items():
        if orig.endswith("_norm"):  # RMSNorm: original `.scale`, diffusers `.weight`
            recipes[f"{orig}.scale"] = Recipe(tuple(f"{s}.weight" for s in sources), combine)
            continue
        for suffix in ("weight", "bias"):
            if f"{sources[0]}.{suffix}" in store or suffix == "weight":
                recipes[f"{orig}.{suffix}"] = Recipe(tuple(f"{s}.{suffix}" for s in sources), combine)
    return recipes


def read_config(folder: Path) -> dict:
    path = folder / "config.json"
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except ValueError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None


def _check_against_config(cfg: dict, folder: Path, store: TensorStore, found: dict) -> None:
    """Where config.json states a size, the tensors must have it: a folder missing a whole block would otherwise
    load as a smaller model. The error names the first missing tensor."""
    for key, (value, prefix) in found.items():  # prefix: the blocks a layer count counts, else None
        said = cfg.get(key)
        if said is None or said == value:
            continue
        hint = ""
        if prefix is not None and said > value:
            block0 = sorted(k for k in store.keys() if k.startswith(f"{prefix}.0."))
            first = block0[0].replace(f"{prefix}.0.", f"{prefix}.{value}.", 1) if block0 else f"{prefix}.{value}.*"
            hint = f": blocks {value}..{said - 1} are missing (first missing tensor: {first})"
        raise CheckpointError(f"{folder / 'config.json'} says {key} = {said}, but {store.describe()} has {value}{hint}")


def infer_flux_config(store: TensorStore, folder: Path, axes_dim=None) -> FluxConfig:
    """From tensor shapes, with the RoPE axes (which shapes cannot tell) from config.json."""
    keys = store.keys()
    for needed in ("x_embedder.weight", "context_embedder.weight", "proj_out.weight"):
        if needed not in store:
            raise CheckpointError(f"{store.describe()}: not a diffusers FLUX transformer (no {needed!r})")
    cfg = read_config(folder)
    if cfg.get("patch_size", 1) != 1:
        raise CheckpointError(f"{folder}: patch_size {cfg['patch_size']} is not supported (FLUX.1 uses 1)")
    hidden, in_channels = store.shape("x_embedder.weight")
    # one past the highest block index: a block missing in the middle is then a missing tensor, not a
    # silently shallower model (and config.json, below, catches a missing last block)
    depth = 1 + max((int(k.split(".")[1]) for k in keys if k.startswith("transformer_blocks.")), default=-1)
    depth_single = 1 + max((int(k.split(".")[1]) for k in keys if k.startswith("single_transformer_blocks.")),
                           default=-1)
    _check_against_config(cfg, folder, store, {
        "num_layers": (depth, "transformer_blocks"),
        "num_single_layers": (depth_single, "single_transformer_blocks"),
        "in_channels": (in_channels, None),
        "joint_attention_dim": (store.shape("context_embedder.weight")[1], None),
    })
    block = "transformer_blocks.0" if depth else "single_transformer_blocks.0"
    head_dim = store.shape(f"{block}.attn.norm_q.weight")[0]
    mlp_hidden = store.shape("transformer_blocks.0.ff.net.0.proj.weight")[0] if depth else store.shape(
        "single_transformer_blocks.0.proj_mlp.weight"
    )[0]
    if axes_dim is None:
        from .original import default_axes_dim

        axes_dim = tuple(cfg.get("axes_dims_rope", default_axes_dim(head_dim)))
    return FluxConfig(
        in_channels=in_channels,
        out_channels=store.shape("proj_out.weight")[0],
        vec_in_dim=store.shape("time_text_embed.text_embedder.linear_1.weight")[1],
        context_in_dim=store.shape("context_embedder.weight")[1],
        hidden_size=hidden,
        mlp_ratio=mlp_hidden / hidden,
        num_heads=hidden // head_dim,
        depth=depth,
        depth_single_blocks=depth_single,
        axes_dim=axes_dim,
        qkv_bias=f"{block}.attn.to_q.bias" in store,
        guidance_embed="time_text_embed.guidance_embedder.linear_1.weight" in store,
    )


# ---------------------------------------------------------------- autoencoder


def autoencoder_recipes(config: AutoEncoderConfig, store: TensorStore) -> dict[str, Recipe]:
    """Original autoencoder names -> diffusers `vae/` names."""
    pairs: dict[str, str] = {}

    def resnet(orig: str, diff: str, shortcut: bool):
        for part in ("norm1", "conv1", "norm2", "conv2"):
            pairs[f"{orig}.{part}"] = f"{diff}.{part}"
        if shortcut:
            pairs[f"{orig}.nin_shortcut"] = f"{diff}.conv_shortcut"

    def mid(side: str):
        resnet(f"{side}.mid.block_1", f"{side}.mid_block.resnets.0", False)
        resnet(f"{side}.mid.block_2", f"{side}.mid_block.resnets.1", False)
        attn = f"{side}.mid_block.attentions.0"
        pairs[f"{side}.mid.attn_1.norm"] = f"{attn}.group_norm"
        for o, d in (("q", "to_q"), ("k", "to_k"), ("v", "to_v"), ("proj_out", "to_out.0")):
            pairs[f"{side}.mid.attn_1.{o}"] = f"{attn}.{d}"

    n = len(config.ch_mult)
    chans = [config.ch * m for m in config.ch_mult]
    for side in ("encoder", "decoder"):
        pairs[f"{side}.conv_in"] = f"{side}.conv_in"
        pairs[f"{side}.norm_out"] = f"{side}.conv_norm_out"
        pairs[f"{side}.conv_out"] = f"{side}.conv_out"
        mid(side)
    for i in range(n):
        c_in = config.ch if i == 0 else chans[i - 1]
        for j in range(config.num_res_blocks):
            resnet(f"encoder.down.{i}.block.{j}", f"encoder.down_blocks.{i}.resnets.{j}", j == 0 and c_in != chans[i])
        if i != n - 1:
            pairs[f"encoder.down.{i}.downsample.conv"] = f"encoder.down_blocks.{i}.downsamplers.0.conv"
    for i in range(n):
        k = n - 1 - i  # diffusers numbers decoder levels in the order they run
        c_in = chans[i + 1] if i != n - 1 else chans[-1]
        for j in range(config.num_res_blocks + 1):
            resnet(f"decoder.up.{i}.block.{j}", f"decoder.up_blocks.{k}.resnets.{j}", j == 0 and c_in != chans[i])
        if i != 0:
            pairs[f"decoder.up.{i}.upsample.conv"] = f"decoder.up_blocks.{k}.upsamplers.0.conv"

    recipes = {}
    for orig, diff in pairs.items():
        for suffix in ("weight", "bias"):
            src = f"{diff}.{suffix}"
            # diffusers stores the attention's 1x1 convs as Linear weights [C, C]
            is_proj = ".attn_1." in orig and orig.rsplit(".", 1)[1] in ("q", "k", "v", "proj_out")
            as_linear = is_proj and suffix == "weight" and src in store and len(store.shape(src)) == 2
            recipes[f"{orig}.{suffix}"] = Recipe((src,), "to_conv1x1" if as_linear else "same")
    return recipes


def infer_autoencoder_config(store: TensorStore, folder: Path, **overrides) -> AutoEncoderConfig:
    if "encoder.conv_in.weight" not in store or "decoder.up_blocks.0.resnets.0.conv1.weight" not in store:
        raise CheckpointError(f"{store.describe()}: not a diffusers autoencoder (no encoder.conv_in / decoder.up_blocks)")
    cfg = read_config(folder)
    for flag in ("use_quant_conv", "use_post_quant_conv"):
        if cfg.get(flag, False):
            raise CheckpointError(f"{folder}: {flag}=true is not the FLUX autoencoder (it has no quant convs)")
    ch = store.shape("encoder.conv_in.weight")[0]
    keys = store.keys()
    levels = len({k.split(".")[2] for k in keys if k.startswith("encoder.down_blocks.")})
    ch_mult = tuple(store.shape(f"encoder.down_blocks.{i}.resnets.0.conv1.weight")[0] // ch for i in range(levels))
    values = dict(
        in_channels=store.shape("encoder.conv_in.weight")[1],
        out_ch=store.shape("decoder.conv_out.weight")[0],
        ch=ch,
        ch_mult=ch_mult,
        num_res_blocks=len({k.split(".")[4] for k in keys if k.startswith("encoder.down_blocks.0.resnets.")}),
        z_channels=store.shape("decoder.conv_in.weight")[1],
        scale_factor=cfg.get("scaling_factor", 0.3611),
        shift_factor=cfg.get("shift_factor", 0.1159) or 0.0,
        norm_groups=cfg.get("norm_num_groups", 32),
        resolution=cfg.get("sample_size", 256) if isinstance(cfg.get("sample_size", 256), int) else 256,
    )
    _check_against_config(cfg, folder, store, {
        "block_out_channels": ([ch * m for m in ch_mult], None),
        "layers_per_block": (values["num_res_blocks"], None),
        "latent_channels": (values["z_channels"], None),
    })
    values.update(overrides)
    return AutoEncoderConfig(**values)


# ---------------------------------------------------------------- writing (our names -> diffusers names)


def transformer_to_diffusers(state_dict: dict, config: FluxConfig) -> dict:
    """Our (original-layout) transformer tensors under diffusers' names, split and reordered as diffusers keeps them."""
    import torch

    out = {}
    module_map = transformer_module_map(config.depth, config.depth_single_blocks, config.guidance_embed)
    for orig, (sources, combine) in module_map.items():
        suffixes = ("scale",) if orig.endswith("_norm") else ("weight", "bias")
        for suffix in suffixes:
            key = f"{orig}.{suffix}"
            if key not in state_dict:
                continue
            t = state_dict[key]
            dsuffix = "weight" if suffix == "scale" else suffix
            if combine == "cat":  # q, k, v rows of `hidden` each, then (single blocks) the mlp rows
                sizes = [config.hidden_size] * 3 + [t.shape[0] - 3 * config.hidden_size] * (len(sources) == 4)
                for src, part in zip(sources, torch.split(t, sizes, dim=0)):
                    out[f"{src}.{dsuffix}"] = part.contiguous()
            elif combine == "swap_halves":
                a, b = t.chunk(2, dim=0)
                out[f"{sources[0]}.{dsuffix}"] = torch.cat([b, a], dim=0)
            else:
                out[f"{sources[0]}.{dsuffix}"] = t
    return out


def transformer_diffusers_config(config: FluxConfig) -> dict:
    return {
        "_class_name": "FluxTransformer2DModel",
        "patch_size": 1,
        "in_channels": config.in_channels,
        "out_channels": config.out_channels,
        "num_layers": config.depth,
        "num_single_layers": config.depth_single_blocks,
        "attention_head_dim": config.head_dim,
        "num_attention_heads": config.num_heads,
        "joint_attention_dim": config.context_in_dim,
        "pooled_projection_dim": config.vec_in_dim,
        "guidance_embeds": config.guidance_embed,
        "axes_dims_rope": list(config.axes_dim),
    }


def autoencoder_to_diffusers(state_dict: dict, config: AutoEncoderConfig) -> dict:
    """Our autoencoder tensors under diffusers' `vae/` names (attention 1x1 convs as Linear weights)."""

    class _Shapes:  # autoencoder_recipes asks the store which attention weights are 2-D; diffusers' always are
        def __contains__(self, k):
            return True

        def shape(self, k):
            return (1, 1)

    out = {}
    for orig, recipe in autoencoder_recipes(config, _Shapes()).items():
        if orig not in state_dict:
            continue
        t = state_dict[orig]
        out[recipe.sources[0]] = t[:, :, 0, 0].contiguous() if recipe.combine == "to_conv1x1" else t
    return out


def autoencoder_diffusers_config(config: AutoEncoderConfig) -> dict:
    n = len(config.ch_mult)
    return {
        "_class_name": "AutoencoderKL",
        "in_channels": config.in_channels,
        "out_channels": config.out_ch,
        "down_block_types": ["DownEncoderBlock2D"] * n,
        "up_block_types": ["UpDecoderBlock2D"] * n,
        "block_out_channels": [config.ch * m for m in config.ch_mult],
        "layers_per_block": config.num_res_blocks,
        "act_fn": "silu",
        "latent_channels": config.z_channels,
        "norm_num_groups": config.norm_groups,
        "sample_size": config.resolution,
        "scaling_factor": config.scale_factor,
        "shift_factor": config.shift_factor,
        "use_quant_conv": False,
        "use_post_quant_conv": False,
        "mid_block_add_attention": True,
        "force_upcast": True,
    }


def save_diffusers_part(tensors: dict, config: dict, folder: Path, dtype=None) -> None:
    """config.json + diffusion_pytorch_model.safetensors in `folder` (written atomically)."""
    from .safetensors_file import save_safetensors

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if dtype is not None:
        tensors = {k: v.to(dtype) for k, v in tensors.items()}
    save_safetensors(tensors, folder / "diffusion_pytorch_model.safetensors")
    with atomic_path(folder / "config.json") as tmp:
        tmp.write_text(json.dumps(config, indent=2) + "\n")
