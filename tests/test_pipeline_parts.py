"""from_pretrained with parts replaced, as diffusers users do (`transformer=...`), including quantized files."""
import numpy as np
import torch

from fluxion import FluxPipeline, load_transformer
from fluxion.checkpoints import quantize_to_gguf


def test_replaced_parts_give_the_same_images(tiny_schnell_dir, tiny_schnell_original_files, tmp_path):
    kw = dict(height=32, width=32, num_inference_steps=2, max_sequence_length=16, output_type="np")
    base = FluxPipeline.from_pretrained(tiny_schnell_dir)
    ref = base("a red circle", generator=torch.Generator().manual_seed(0), **kw).images
    transformer_file, _ = tiny_schnell_original_files
    for parts in ({"transformer": str(transformer_file)}, {"transformer": load_transformer(transformer_file)},
                  {"text_encoder_2": base.t5.model, "vae": base.vae}):
        pipe = FluxPipeline.from_pretrained(tiny_schnell_dir, **parts)
        out = pipe("a red circle", generator=torch.Generator().manual_seed(0), **kw).images
        assert np.allclose(out, ref, atol=1e-5), parts.keys()
    gguf = tmp_path / "t.gguf"
    quantize_to_gguf(transformer_file, gguf, "Q8_0")
    quantized = FluxPipeline.from_pretrained(tiny_schnell_dir, transformer=str(gguf))
    out = quantized("a red circle", generator=torch.Generator().manual_seed(0), **kw).images
    assert not np.array_equal(out, ref) and np.abs(out - ref).mean() < 0.02
