"""Multi-process inference: sequence (context) parallelism of the FLUX transformer over torch.distributed.

`FluxTransformer.enable_parallelism(config=ContextParallelConfig(ulysses_degree=..., ring_degree=...))`, with
diffusers' names; see `fluxion.distributed.sequence_parallel`.
"""
from .sequence_parallel import ContextParallelConfig, SequenceParallel, ShardLayout, communication_bytes

__all__ = ["ContextParallelConfig", "SequenceParallel", "ShardLayout", "communication_bytes"]
