"""Giving back mapped weight pages (fluxion.checkpoints.pages) and the pipeline's CPU offload built on it.

The madvise calls are recorded (and still made): they must cover the file ranges of the module's tensors and
nothing else, and the model must compute exactly the same afterwards. One test reads the process's RssFile
to see the pages leave the resident set; another checks that in-place changes of a mapped weight survive.
"""
import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from fluxion import FluxPipeline
from fluxion.checkpoints import SafetensorsFile, load_transformer, write_gguf
from fluxion.checkpoints import pages
from fluxion.cli import main
from fluxion.quant import QuantLinear
from tiny_quant import run, tiny_inputs, tiny_model

PAGE = pages.PAGE


@pytest.fixture
def madvised(monkeypatch):
    """[(address, length)] of every madvise call, which still happens."""
    calls = []
    real = pages._madvise

    def record(address, length):
        calls.append((address, length))
        real(address, length)

    monkeypatch.setattr(pages, "_madvise", record)
    return calls


@pytest.fixture(scope="module")
def gguf_path(tmp_path_factory):
    # hidden 256: Q8_0 layers of several pages each
    path = tmp_path_factory.mktemp("pages") / "flux-tiny-q8.gguf"
    model = tiny_model(seed=5, hidden_size=256, num_heads=4, axes_dim=(16, 24, 24), context_in_dim=64)
    write_gguf(model.state_dict(), path, "Q8_0", config=model.config.to_dict())
    return path


def file_ranges(path) -> list[tuple[int, int]]:
    reader = gguf.GGUFReader(path)
    return sorted((int(t.data_offset), int(t.data_offset) + int(t.n_bytes)) for t in reader.tensors)


def test_release_pages_advises_exactly_the_tensors_file_ranges(gguf_path, madvised):
    model = load_transformer(gguf_path)  # float32: the float tensors (F32 in the file) are mapped too
    inputs = tiny_inputs(model.config)
    before = run(model, inputs)
    ((mapping, _),) = pages.mapped_ranges(model).items()
    assert mapping.path == str(gguf_path)
    released = pages.release_pages(model)
    assert released > 0 and madvised
    assert sum(length for _, length in madvised) == released
    tensors = file_ranges(gguf_path)
    covered = 0
    for address, length in madvised:
        start = mapping.file_offset(address)
        assert address % PAGE == 0 and length % PAGE == 0
        assert tensors[0][0] <= start and start + length <= tensors[-1][1]  # the tensor data, not the header
        covered += length
    assert covered > 0.95 * sum(b - a for a, b in tensors)  # whole pages inside the merged ranges
    bf16 = load_transformer(gguf_path, torch.bfloat16)  # float tensors copied to bf16: only the blocks are mapped
    quantized = [(a, b) for (a, b), t in zip(tensors, sorted(gguf.GGUFReader(gguf_path).tensors,
                                                             key=lambda t: int(t.data_offset)))
                 if t.tensor_type.name == "Q8_0"]
    (spans,) = pages.mapped_ranges(bf16).values()
    assert sum(b - a for a, b in spans) == sum(b - a for a, b in quantized)
    assert torch.equal(run(model, inputs), before)


def test_release_pages_of_one_block_touches_only_that_block(gguf_path, madvised):
    model = load_transformer(gguf_path)
    block = model.double_blocks[1]
    ranges = pages.mapped_ranges(block)
    (spans,) = ranges.values()
    others = [t for n, t in model.named_buffers() if not n.startswith("double_blocks.1.") and n.endswith("qdata")]
    other_spans = [s for ss in pages.mapped_ranges(others).values() for s in ss]
    pages.release_pages(block)
    assert madvised
    for start, length in madvised:
        for lo, hi in other_spans:
            assert start + length <= lo or hi <= start  # no page of another module's weights
    quantized = sum(m.qdata.numel() for m in block.modules() if isinstance(m, QuantLinear))
    assert sum(hi - lo for lo, hi in spans) >= quantized


def rss_file_kib() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("RssFile:"):
            return int(line.split()[1])
    pytest.skip("no RssFile in /proc/self/status")


def mapped_module(tmp_path, mib: int = 32) -> nn.Module:
    path = tmp_path / "big.safetensors"
    save_file({"w": torch.randn(mib * 2**20 // 4, generator=torch.Generator().manual_seed(0))}, str(path))
    module = nn.Module()
    module.register_buffer("w", SafetensorsFile(path).get("w"))  # zero-copy view of the mapping
    return module


def test_released_pages_leave_the_resident_set(tmp_path):
    module = mapped_module(tmp_path, 32)
    total = float(module.w.sum())  # every page read: resident
    resident = rss_file_kib()
    released = pages.release_pages(module)
    dropped = resident - rss_file_kib()
    assert released >= 31 * 2**20
    assert dropped >= 24 * 1024, f"RssFile dropped by {dropped} KiB only"
    assert float(module.w.sum()) == total  # read again from the file: same values


def test_pages_changed_in_place_are_kept(tmp_path, madvised):
    module = mapped_module(tmp_path, 4)
    original = module.w.clone()
    with torch.no_grad():
        module.w[: 3 * PAGE // 4] += 1.0  # three pages become private copies (a fused LoRA would do this)
    pages.release_pages(module)
    assert torch.equal(module.w[: 3 * PAGE // 4], original[: 3 * PAGE // 4] + 1.0)
    assert torch.equal(module.w[3 * PAGE // 4 :], original[3 * PAGE // 4 :])
    first = module.w.data_ptr()
    assert madvised and all(not (a < first + 3 * PAGE and first < a + n) for a, n in madvised)


def test_unmapped_tensors_are_untouched(madvised):
    assert pages.release_pages(nn.Linear(256, 256)) == 0 and not madvised


def test_text_encoders_loaded_by_transformers_are_released(tiny_schnell_dir, madvised):
    """transformers maps .safetensors zero-copy too: those pages are file-backed and released the same way."""
    pipe = FluxPipeline.from_pretrained(tiny_schnell_dir)
    assert pages.mapped_ranges(pipe.clip.model) and pages.mapped_ranges(pipe.t5.model)
    pipe.clip(["a red circle"])
    assert pages.release_pages(pipe.clip.model) > 0 and madvised


def test_stream_blocks_releases_each_block_after_its_forward(gguf_path, madvised):
    model = load_transformer(gguf_path)
    inputs = tiny_inputs(model.config)
    before = run(model, inputs)
    handles = pages.stream_blocks(model)
    assert [n for n, _ in pages.block_lists(model)] == ["double_blocks", "single_blocks"]
    assert len(handles) == model.config.depth + model.config.depth_single_blocks
    assert torch.equal(run(model, inputs), before)
    assert len(madvised) >= len(handles)
    for h in handles:
        h.remove()


# ---------------------------------------------------------------- the pipeline


@pytest.fixture
def released(monkeypatch):
    """The modules FluxPipeline's offload gives back, in order (still released)."""
    seen = []
    import fluxion.pipelines.placement as pipeline_module

    def record(module):
        seen.append(module)
        return pages.release_pages(module)

    monkeypatch.setattr(pipeline_module, "release_pages", record)
    return seen


CALL = dict(height=32, width=32, num_inference_steps=2, max_sequence_length=16, output_type="np")


def generate(pipe):
    return pipe("a red circle", generator=torch.Generator().manual_seed(0), **CALL).images


def test_model_cpu_offload_releases_each_part_after_it_runs(tiny_schnell_dir, released):
    pipe = FluxPipeline.from_pretrained(tiny_schnell_dir)  # float32 files in float32: zero-copy weights
    pipe.set_progress_bar_config(disable=True)
    base = generate(pipe)
    assert released == []  # off by default
    pipe.enable_model_cpu_offload()
    assert pipe.device.type == "cpu"
    images = generate(pipe)
    assert released == [pipe.clip.model, pipe.t5.model, pipe.transformer, pipe.vae]
    assert np.array_equal(images, base)
    assert pages.mapped_ranges(pipe.transformer)  # the weights really are views of the file


def test_sequential_cpu_offload_streams_blocks(tiny_schnell_dir, madvised):
    pipe = FluxPipeline.from_pretrained(tiny_schnell_dir)
    pipe.set_progress_bar_config(disable=True)
    base = generate(pipe)
    pipe.enable_sequential_cpu_offload()
    pipe.enable_sequential_cpu_offload()  # idempotent: hooks once
    t = pipe.transformer
    blocks = len(t.double_blocks) + len(t.single_blocks) + len(pipe.t5.model.encoder.block)
    assert len(pipe._block_hooks) == blocks
    assert np.array_equal(generate(pipe), base)
    assert madvised


def test_cli_max_memory_streams_a_transformer_larger_than_the_budget(tiny_schnell_dir, tmp_path, capsys):
    args = ["generate", "a red circle", "--model", str(tiny_schnell_dir), "--steps", "1", "--height", "32",
            "--width", "32", "--out", str(tmp_path / "a.png")]
    assert main(args + ["--max-memory", "0.00001"]) == 0
    assert "streaming its blocks" in capsys.readouterr().out
    assert main(args + ["--max-memory", "100"]) == 0
    assert "streaming" not in capsys.readouterr().out
