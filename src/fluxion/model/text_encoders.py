"""Text conditioning: T5 per-token embeddings and the CLIP pooled vector, through `transformers`.

Tokenizers and encoders are read from a diffusers-layout folder (text_encoder/ + tokenizer/ = CLIP,
text_encoder_2/ + tokenizer_2/ = T5). No attention mask is used, as in FLUX.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

log = logging.getLogger(__name__)
_warned_lengths: set[int] = set()  # warn about truncation once per length, not on every call


def load_tokenizer(tokenizer_dir: Path):
    """A tokenizer folder, through `transformers`."""
    import transformers

    return transformers.AutoTokenizer.from_pretrained(str(tokenizer_dir))


def _load(model_class: str, model_dir: Path, tokenizer_dir: Path, dtype: torch.dtype | None):
    """(tokenizer, model in eval mode) from local folders, through `transformers`."""
    import transformers

    transformers.utils.logging.set_verbosity_error()
    tokenizer = load_tokenizer(tokenizer_dir)
    model = getattr(transformers, model_class).from_pretrained(str(model_dir), dtype=dtype or "auto").eval()
    return tokenizer, model


@dataclass
class T5Embedder:
    tokenizer: object
    model: torch.nn.Module

    @classmethod
    def from_folders(cls, model_dir: Path, tokenizer_dir: Path, dtype: torch.dtype | None = None) -> "T5Embedder":
        return cls(*_load("T5EncoderModel", model_dir, tokenizer_dir, dtype))

    @classmethod
    def from_checkpoint(cls, path: str | Path, tokenizer_dir: Path,
                        dtype: torch.dtype = torch.bfloat16) -> "T5Embedder":
        """The encoder from one file (GGUF, fp8 or float .safetensors; quantized weights stay quantized: see
        `fluxion.checkpoints.t5.load_t5_encoder`) and the tokenizer from a folder."""
        from ..checkpoints.t5 import load_t5_encoder

        return cls(load_tokenizer(tokenizer_dir), load_t5_encoder(path, dtype))

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def tokenize(self, prompts: list[str], max_length: int) -> Tensor:
        ids = self.tokenizer(
            prompts, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt"
        ).input_ids
        if max_length not in _warned_lengths:  # the untruncated pass only until we have warned once
            full = self.tokenizer(prompts, padding="longest", return_tensors="pt").input_ids
            if full.shape[-1] > max_length:
                _warned_lengths.add(max_length)
                log.warning("a prompt is longer than max_sequence_length=%d T5 tokens and was truncated", max_length)
        return ids

    def __call__(self, prompts: list[str], max_length: int) -> Tensor:
        """[B, max_length, d_model] last hidden states."""
        ids = self.tokenize(prompts, max_length).to(self.model.device)
        return self.model(input_ids=ids).last_hidden_state


@dataclass
class CLIPEmbedder:
    tokenizer: object
    model: torch.nn.Module

    @classmethod
    def from_folders(cls, model_dir: Path, tokenizer_dir: Path, dtype: torch.dtype | None = None) -> "CLIPEmbedder":
        return cls(*_load("CLIPTextModel", model_dir, tokenizer_dir, dtype))

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def max_length(self) -> int:
        n = getattr(self.tokenizer, "model_max_length", 77)
        return n if n and n < 10_000 else 77

    def tokenize(self, prompts: list[str]) -> Tensor:
        return self.tokenizer(
            prompts, padding="max_length", max_length=self.max_length, truncation=True, return_tensors="pt"
        ).input_ids

    def __call__(self, prompts: list[str]) -> Tensor:
        """[B, hidden] pooled output (the end-of-text token after the final layer norm)."""
        ids = self.tokenize(prompts).to(self.model.device)
        return self.model(input_ids=ids).pooler_output
