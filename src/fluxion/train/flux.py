"""Training a FLUX transformer (with its T5 and CLIP encoders) on the shapes world: rectified flow."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from ..checkpoints import load_autoencoder
from ..checkpoints.diffusers import save_diffusers_part, transformer_diffusers_config, transformer_to_diffusers
from ..data.loader import BatchSource
from ..data.shapes import WORD_ROLES, caption, sample_scene, word_roles
from ..data.tokenizers import build_clip_tokenizer, build_word_t5_tokenizer, clip_special_ids
from ..model.text_encoders import CLIPEmbedder, T5Embedder
from ..model.transformer import FluxConfig, FluxTransformer
from ..pipelines import FluxPipeline, PipelineDefaults
from ..flow import SCHNELL_SCHEDULE, flow_loss_per_row, image_ids, noised, pack, sample_sigmas, text_ids, velocity_target
from ..images import grid, images_to_tensor
from .config import TrainConfig
from .deepen import deepened

SCHEDULER_CONFIG = {  # schnell-style: no resolution shift (the mini model works at one size)
    "_class_name": "FlowMatchEulerDiscreteScheduler",
    "num_train_timesteps": 1000,
    "shift": 1.0,
    "use_dynamic_shifting": False,
    "base_shift": 0.5,
    "max_shift": 1.15,
    "base_image_seq_len": 256,
    "max_image_seq_len": 4096,
}


def caption_corpus(seed: int, n: int = 4000) -> list[str]:
    """Training-distribution captions (paraphrases included), without rendering images."""
    out = []
    for i in range(n):
        rng = np.random.default_rng([seed, 7919, i])
        out.append(caption(sample_scene(rng, "exclude"), rng, paraphrase=True))
    return out


def build_tokenizers(run_dir: Path, seed: int, init_from: str | None = None) -> tuple[Path, Path]:
    """The run's tokenizers: built from the training captions, or copied from `init_from`'s model folder (its
    text encoders' vocabulary must be the one they were trained on)."""
    clip_dir, t5_dir = run_dir / "tokenizer", run_dir / "tokenizer_2"
    if not (clip_dir / "tokenizer_config.json").is_file() or not (t5_dir / "tokenizer_config.json").is_file():
        if init_from is not None:
            shutil.copytree(Path(init_from) / "tokenizer", clip_dir, dirs_exist_ok=True)
            shutil.copytree(Path(init_from) / "tokenizer_2", t5_dir, dirs_exist_ok=True)
            return clip_dir, t5_dir
        corpus = caption_corpus(seed)
        words = sorted({w for c in corpus for w in c.lower().split() if w.isalpha()})
        build_clip_tokenizer(clip_dir, words=words)
        build_word_t5_tokenizer(words, t5_dir)
    return clip_dir, t5_dir


class FluxTask(nn.Module):
    """Rectified flow on the shapes world: the transformer and both text encoders learn, the autoencoder is frozen.
    A task of the one trainer (`fluxion.train.trainer`)."""

    def __init__(self, cfg: TrainConfig, device: torch.device | str = "cpu"):
        import transformers

        super().__init__()
        transformers.utils.logging.set_verbosity_error()
        self.cfg = cfg
        from accelerate import PartialState

        with PartialState().main_process_first():  # the main process writes them; the others then read them
            clip_dir, t5_dir = build_tokenizers(cfg.run_dir, cfg.seed, cfg.init_from)
        self.clip_tok = transformers.AutoTokenizer.from_pretrained(str(clip_dir))
        self.t5_tok = transformers.AutoTokenizer.from_pretrained(str(t5_dir))
        bos, eos, pad = clip_special_ids(self.clip_tok)
        t5_cfg = transformers.T5Config(
            **{"d_model": 128, "d_kv": 32, "d_ff": 256, "num_layers": 2, "num_heads": 4, **cfg.t5},
            vocab_size=len(self.t5_tok), feed_forward_proj="gated-gelu", dropout_rate=0.0,
            pad_token_id=0, eos_token_id=1, decoder_start_token_id=0, tie_word_embeddings=False,
        )
        clip_cfg = transformers.CLIPTextConfig(
            **{"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 1, "num_attention_heads": 2,
               "projection_dim": 64, **cfg.clip},
            vocab_size=len(self.clip_tok), max_position_embeddings=77, bos_token_id=bos, eos_token_id=eos,
            pad_token_id=pad,
        )
        vae = load_autoencoder(cfg.vae_path).requires_grad_(False).eval()
        fcfg = FluxConfig(**{
            "hidden_size": 128, "num_heads": 4, "depth": 2, "depth_single_blocks": 4, "axes_dim": (8, 12, 12),
            "guidance_embed": False,
            **cfg.transformer,
            "in_channels": 4 * vae.config.z_channels, "vec_in_dim": clip_cfg.hidden_size,
            "context_in_dim": t5_cfg.d_model,
        })
        self.model = nn.ModuleDict({
            "transformer": FluxTransformer(fcfg),
            "t5": transformers.T5EncoderModel(t5_cfg),
            "clip": transformers.CLIPTextModel(clip_cfg),
        })
        init_transformer_(self.model["transformer"])
        if cfg.init_from is not None:
            load_trained_(self.model, cfg.init_from)
        # The text-role head reads the T5 outputs; it trains the encoder and is not part of the model (not exported)
        self.role_head = nn.Linear(t5_cfg.d_model, len(WORD_ROLES)) if cfg.text_role_weight > 0 else None
        self.device = torch.device(device)
        self.model.to(self.device)
        self.vae = vae.to(self.device)  # frozen: the trainer saves and averages only what learns
        side = 128 // vae.downsample_factor
        self.tokens = (side // 2) ** 2, 4 * vae.config.z_channels
        self.img_ids = image_ids(side, side, self.device)
        self.txt_ids = text_ids(cfg.max_sequence_length, self.device)
        self.batches = BatchSource.for_run(cfg)

    def ema_module(self) -> nn.Module:
        return self.model

    def encode_text(self, model: nn.ModuleDict, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        t5 = T5Embedder(self.t5_tok, model["t5"])
        clip = CLIPEmbedder(self.clip_tok, model["clip"])
        return t5(captions, self.cfg.max_sequence_length), clip(captions)

    def batch(self, step: int, generator: torch.Generator) -> dict:
        """Step `step`'s whole batch: images, captions (some dropped to empty), noise and noise levels."""
        cfg = self.cfg
        images, captions = self.batches(step)
        drop = torch.rand(len(captions), generator=generator) < cfg.caption_dropout
        captions = ["" if d else c for c, d in zip(captions, drop.tolist())]
        noise = torch.randn((len(captions), *self.tokens), generator=generator)  # on the CPU: same on any device
        sigma = sample_sigmas(len(captions), cfg.timestep_sampling, generator, cfg.logit_mean, cfg.logit_std)
        rows = {"images": images, "captions": captions, "noise": noise, "sigma": sigma}
        if self.role_head is not None:
            rows["roles"] = self.role_targets(captions)
        return rows

    def role_targets(self, captions: list[str]) -> torch.Tensor:
        """[B, max_sequence_length] WORD_ROLES index of each T5 token's word; -100 (ignored) on the end-of-text
        and padding tokens, and on every token of a dropped (empty) caption."""
        enc = self.t5_tok(captions, padding="max_length", max_length=self.cfg.max_sequence_length, truncation=True)
        out = torch.full((len(captions), self.cfg.max_sequence_length), -100, dtype=torch.long)
        for i, text in enumerate(captions):
            roles = word_roles(text)
            for j, w in enumerate(enc.word_ids(i)):
                if w is not None:
                    out[i, j] = roles[w]
        return out

    def forward(self, rows: dict) -> tuple[torch.Tensor, dict]:
        with torch.no_grad():
            x0 = pack(self.vae.encode(images_to_tensor(rows["images"], self.device))).float()
        noise, sigma = rows["noise"].to(self.device), rows["sigma"].to(self.device)
        txt, pooled = self.encode_text(self.model, rows["captions"])
        pred = self.model["transformer"](noised(x0, noise, sigma), self.img_ids, txt, self.txt_ids, sigma, pooled)
        loss = flow_loss_per_row(pred, velocity_target(x0, noise), sigma, self.cfg.loss_weighting)
        if self.role_head is None:
            return loss, {}
        targets = rows["roles"].to(self.device)
        ce = nn.functional.cross_entropy(self.role_head(txt.float()).transpose(1, 2), targets, reduction="none")
        role = ce.sum(1) / (targets >= 0).sum(1).clamp(min=1)  # mean over each caption's words; 0 when dropped
        return loss + self.cfg.text_role_weight * role, {"role_loss": float(role.detach().mean())}

    def pipeline(self, model: nn.ModuleDict) -> FluxPipeline:
        defaults = PipelineDefaults(**{"sample_size": 128 // self.vae.downsample_factor,
                                       "max_sequence_length": self.cfg.max_sequence_length, **self.cfg.defaults})
        pipe = FluxPipeline(model["transformer"], self.vae, CLIPEmbedder(self.clip_tok, model["clip"]),
                            T5Embedder(self.t5_tok, model["t5"]), SCHNELL_SCHEDULE, defaults)
        pipe.set_progress_bar_config(disable=True)
        return pipe.to(self.device)

    @torch.no_grad()
    def sample_grid(self, model: nn.ModuleDict, step: int) -> Image.Image:
        was_training = model.training
        prompts = self.cfg.sample_prompts or ["a red circle", "two blue squares", "a green triangle left of a yellow circle"]
        model.eval()
        images = self.pipeline(model)(prompts, num_inference_steps=self.cfg.sample_steps,
                                      generator=torch.Generator().manual_seed(0)).images
        model.train(was_training)
        return grid(images, columns=min(8, len(images)))

    def export(self, model: nn.ModuleDict, folder: Path) -> None:
        """The diffusers folder layout, so from_pretrained takes the same path as for real FLUX.1 folders."""
        folder = Path(folder)
        t = model["transformer"]
        save_diffusers_part(transformer_to_diffusers(t.state_dict(), t.config), transformer_diffusers_config(t.config),
                            folder / "transformer")
        vae_src = Path(self.cfg.vae_path)
        vae_src = vae_src / "vae" if (vae_src / "vae").is_dir() else vae_src
        shutil.copytree(vae_src, folder / "vae", dirs_exist_ok=True)
        model["clip"].save_pretrained(folder / "text_encoder")
        model["t5"].save_pretrained(folder / "text_encoder_2")
        self.clip_tok.save_pretrained(folder / "tokenizer")
        self.t5_tok.save_pretrained(folder / "tokenizer_2")
        (folder / "scheduler").mkdir(exist_ok=True)
        (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(SCHEDULER_CONFIG, indent=2) + "\n")
        index = {
            "_class_name": "FluxPipeline",
            "_diffusers_version": "0.42.1",
            "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
            "text_encoder": ["transformers", "CLIPTextModel"],
            "text_encoder_2": ["transformers", "T5EncoderModel"],
            "tokenizer": ["transformers", "CLIPTokenizer"],
            "tokenizer_2": ["transformers", "T5TokenizerFast"],
            "transformer": ["diffusers", "FluxTransformer2DModel"],
            "vae": ["diffusers", "AutoencoderKL"],
            "_fluxion_defaults": {"sample_size": 128 // self.vae.downsample_factor,
                                  "max_sequence_length": self.cfg.max_sequence_length, **self.cfg.defaults},
        }
        (folder / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")


def load_trained_(model: nn.ModuleDict, folder: str) -> None:
    """Start from a trained model folder (diffusers layout, e.g. models/fluxion-mini): its transformer and both
    text encoders, which must have the shapes this config builds; one error names every mismatch. A config with
    more single-stream blocks than the trained transformer grows it: the new blocks start with zero gates
    (`deepen.deepened`), so training starts from the trained model's outputs."""
    from ..pipelines import FluxPipeline

    pipe = FluxPipeline.from_pretrained(folder, torch_dtype=torch.float32)
    transformer = pipe.transformer
    want_single = model["transformer"].config.depth_single_blocks
    if transformer.config.depth_single_blocks < want_single:
        transformer = deepened(transformer, want_single)
    trained = {"transformer": transformer, "t5": pipe.t5.model, "clip": pipe.clip.model}
    bad = []
    for name, src in trained.items():
        want = model[name].state_dict()
        got = src.state_dict()
        bad += [f"{name}.{k}" for k in sorted(want.keys() | got.keys())
                if k not in got or k not in want or got[k].shape != want[k].shape]
    if bad:
        raise ValueError(f"init_from {folder}: the config's shapes differ from the trained model's at {len(bad)} "
                         f"tensors (first: {', '.join(bad[:3])}); set transformer/t5/clip as the model was trained")
    for name, src in trained.items():
        model[name].load_state_dict(src.state_dict(), strict=True)


def init_transformer_(model: FluxTransformer) -> None:
    """Zero the output layer and gates' modulation so training starts from the identity (DiT's adaLN-Zero)."""
    nn.init.zeros_(model.final_layer.linear.weight)
    nn.init.zeros_(model.final_layer.linear.bias)
    for block in list(model.double_blocks) + list(model.single_blocks):
        for mod in [m for m in block.modules() if m.__class__.__name__ == "Modulation"]:
            nn.init.zeros_(mod.lin.weight)
            nn.init.zeros_(mod.lin.bias)
