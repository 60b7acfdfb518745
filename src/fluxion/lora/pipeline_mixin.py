"""LoRA methods of FluxPipeline (diffusers' names). Filled in by the LoRA work."""
from __future__ import annotations


class LoraMixin:
    pass
