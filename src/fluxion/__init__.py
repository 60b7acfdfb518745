"""fluxion: a from-scratch FLUX.1 engine."""
from .checkpoints import CheckpointError, load_autoencoder, load_transformer, save_autoencoder, save_transformer
from .model.autoencoder import AutoEncoder, AutoEncoderConfig
from .model.transformer import FluxConfig, FluxTransformer

__all__ = [
    "FluxTransformer",
    "FluxConfig",
    "AutoEncoder",
    "AutoEncoderConfig",
    "load_transformer",
    "load_autoencoder",
    "save_transformer",
    "save_autoencoder",
    "CheckpointError",
    "FluxPipeline",
]


def __getattr__(name):  # the pipeline pulls in transformers: import it only when asked for
    if name == "FluxPipeline":
        from .pipelines import FluxPipeline

        return FluxPipeline
    raise AttributeError(name)
