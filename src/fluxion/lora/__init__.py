"""LoRA for fluxion: several named adapters at once on the transformer (and CLIP), every common file
layout in (diffusers/PEFT, kohya, XLabs, original keys), the diffusers layout out, fuse / unfuse, hotswap.

Pipeline methods (diffusers' names) come from `LoraMixin`, which FluxPipeline inherits:
`load_lora_weights`, `set_adapters`, `get_active_adapters`, `get_list_adapters`, `disable_lora`,
`enable_lora`, `delete_adapters`, `unload_lora_weights`, `fuse_lora`, `unfuse_lora`, `save_lora_weights`.
For training: `DEFAULT_TARGETS`, `add_trainable_adapter`, `save_lora_adapter`.
"""
from .formats import LORA_WEIGHT_NAME, ClipNames, FluxNames, parse_lora_state_dict, read_lora_source
from .io import lora_state_dict, save_lora_adapter
from .layers import (
    DEFAULT_TARGETS,
    AdapterInfo,
    LoraPiece,
    active_adapters,
    adapter_parameters,
    adapter_pieces,
    add_trainable_adapter,
    attach_adapter,
    delete_adapters,
    enable_lora,
    fuse_lora,
    hotswap_adapter,
    list_adapters,
    set_adapters,
    unfuse_lora,
    unload_lora,
)
from .pipeline_mixin import LoraMixin

__all__ = [
    "DEFAULT_TARGETS",
    "LORA_WEIGHT_NAME",
    "AdapterInfo",
    "ClipNames",
    "FluxNames",
    "LoraMixin",
    "LoraPiece",
    "active_adapters",
    "adapter_parameters",
    "adapter_pieces",
    "add_trainable_adapter",
    "attach_adapter",
    "delete_adapters",
    "enable_lora",
    "fuse_lora",
    "hotswap_adapter",
    "list_adapters",
    "lora_state_dict",
    "parse_lora_state_dict",
    "read_lora_source",
    "save_lora_adapter",
    "set_adapters",
    "unfuse_lora",
    "unload_lora",
]
