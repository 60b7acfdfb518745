"""Shared pytest fixtures (tiny random FLUX checkpoints; see tests/fixtures.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

_TESTS_DIR = str(Path(__file__).resolve().parent)
if _TESTS_DIR not in sys.path:
    sys.path.insert(0, _TESTS_DIR)


@pytest.fixture(scope="session")
def tiny_dev_dir(tmp_path_factory) -> Path:
    """A tiny random diffusers FluxPipeline folder, FLUX.1-dev flavour (guidance embedder)."""
    from fixtures import make_tiny_flux_folder

    return make_tiny_flux_folder(tmp_path_factory.mktemp("tiny_flux_dev") / "pipe", guidance_embeds=True, seed=0)


@pytest.fixture(scope="session")
def tiny_schnell_dir(tmp_path_factory) -> Path:
    """A tiny random diffusers FluxPipeline folder, FLUX.1-schnell flavour (no guidance embedder)."""
    from fixtures import make_tiny_flux_folder

    return make_tiny_flux_folder(tmp_path_factory.mktemp("tiny_flux_schnell") / "pipe", guidance_embeds=False, seed=1)


@pytest.fixture(scope="session")
def tiny_dev_original_files(tiny_dev_dir, tmp_path_factory) -> tuple[Path, Path]:
    """(transformer_file, ae_file): the tiny dev weights in the original BFL layout (no key prefix)."""
    from fixtures import write_original_autoencoder_file, write_original_transformer_file

    out = tmp_path_factory.mktemp("tiny_flux_dev_original")
    transformer_file = write_original_transformer_file(tiny_dev_dir, out / "flux1-tiny-dev.safetensors")
    ae_file = write_original_autoencoder_file(tiny_dev_dir, out / "ae.safetensors")
    return transformer_file, ae_file


@pytest.fixture(scope="session")
def tiny_schnell_original_files(tiny_schnell_dir, tmp_path_factory) -> tuple[Path, Path]:
    """(transformer_file, ae_file): the tiny schnell weights in the original BFL layout (no key prefix)."""
    from fixtures import write_original_autoencoder_file, write_original_transformer_file

    out = tmp_path_factory.mktemp("tiny_flux_schnell_original")
    transformer_file = write_original_transformer_file(tiny_schnell_dir, out / "flux1-tiny-schnell.safetensors")
    ae_file = write_original_autoencoder_file(tiny_schnell_dir, out / "ae.safetensors")
    return transformer_file, ae_file


@pytest.fixture(scope="session")
def tiny_fill_dir(tmp_path_factory) -> Path:
    """A tiny random FLUX.1 Fill-layout folder (dev flavour): transformer in_channels = 16 noisy + 16 masked-image
    + 16 mask channels (the tiny VAE's scale factor 2: 2x2 mask pixels per latent pixel, packed 2x2), out 16."""
    from fixtures import make_tiny_flux_folder

    return make_tiny_flux_folder(tmp_path_factory.mktemp("tiny_flux_fill") / "pipe", guidance_embeds=True, seed=2,
                                 transformer_overrides={"in_channels": 48, "out_channels": 16})


@pytest.fixture(scope="session")
def tiny_control_dir(tmp_path_factory) -> Path:
    """A tiny random FLUX.1 Canny/Depth-layout folder (dev flavour): in_channels 32 (noisy + control), out 16."""
    from fixtures import make_tiny_flux_folder

    return make_tiny_flux_folder(tmp_path_factory.mktemp("tiny_flux_control") / "pipe", guidance_embeds=True, seed=3,
                                 transformer_overrides={"in_channels": 32, "out_channels": 16})


@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread():
    """Tiny test models run fastest on one thread, and it keeps them fast when another job holds a core."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
