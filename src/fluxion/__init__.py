"""fluxion: a from-scratch FLUX.1 engine."""
from .checkpoints import CheckpointError, load_autoencoder, load_transformer, save_autoencoder, save_transformer
from .distributed import ContextParallelConfig
from .model.autoencoder import AutoEncoder, AutoEncoderConfig
from .model.transformer import FluxConfig, FluxTransformer

__all__ = [
    "FluxTransformer",
    "FluxConfig",
    "ContextParallelConfig",
    "AutoEncoder",
    "AutoEncoderConfig",
    "load_transformer",
    "load_autoencoder",
    "save_transformer",
    "save_autoencoder",
    "CheckpointError",
    "FluxPipeline",
    "FluxImg2ImgPipeline",
    "FluxInpaintPipeline",
    "FluxFillPipeline",
    "FluxControlPipeline",
    "FluxKontextPipeline",
    "FluxControlNetPipeline",
    "FluxControlNetImg2ImgPipeline",
    "FluxControlNetInpaintPipeline",
    "FluxControlNetModel",
    "FluxMultiControlNetModel",
]


def __getattr__(name):  # the pipelines pull in transformers: import them only when asked for
    if name in ("FluxControlNetModel", "FluxMultiControlNetModel"):
        from .model import controlnet

        return getattr(controlnet, name)
    if name.startswith("Flux") and name.endswith("Pipeline"):
        from . import pipelines

        return getattr(pipelines, name)
    raise AttributeError(name)
