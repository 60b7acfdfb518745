from .transformer import PRESETS, FluxConfig, FluxTransformer, count_parameters, preset

__all__ = ["FluxConfig", "FluxTransformer", "PRESETS", "preset", "count_parameters"]
