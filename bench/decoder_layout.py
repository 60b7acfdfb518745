"""The autoencoder on a CPU: activations in channels-first (NCHW) against channels-last (NHWC) layout.

oneDNN's convolutions work in a blocked channels-last layout; a channels-first input is reordered before and after
every convolution, which for the few-channel convolutions of a small decoder costs as much as the arithmetic.
Prints the median milliseconds per image of each layout (the decoder runs channels-last on CPUs; the encoder is
channels-first unless set), for fluxion-mini's decoder and encoder and FLUX.1-width
ones (random weights), all at 128x128, and the largest difference between their outputs.

    .venv/bin/python bench/decoder_layout.py [--threads 2] [--batch 1]
    ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 .venv/bin/python bench/decoder_layout.py   # as on AVX2 CPUs
"""
from __future__ import annotations

import argparse
import platform
import sys

import torch

from fluxion.eval.speed import median_seconds
from fluxion.model.autoencoder import AutoEncoder, AutoEncoderConfig
from fluxion.pipelines import FluxPipeline, default_model_dir


def autoencoders(batch: int) -> list[tuple[str, AutoEncoder, torch.Tensor]]:
    mini = FluxPipeline.from_pretrained(default_model_dir()).vae
    flux = AutoEncoder(AutoEncoderConfig()).eval()  # FLUX.1's widths (128-512 channels), random weights
    g = torch.Generator().manual_seed(0)
    return [("fluxion-mini, 128x128", mini, torch.randn(batch, 16, 16, 16, generator=g)),
            ("FLUX.1 widths, 128x128", flux, torch.randn(batch, 16, 16, 16, generator=g))]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=20)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"{platform.processor() or platform.machine()}, torch CPU capability "
          f"{torch.backends.cpu.get_cpu_capability()}, {args.threads} threads, batch {args.batch}\n")
    print("| part | channels-first ms/image | channels-last ms/image | speed-up | max difference |")
    print("|---|---:|---:|---:|---:|")
    for name, vae, z in autoencoders(args.batch):
        x = torch.rand(args.batch, 3, 128, 128, generator=torch.Generator().manual_seed(1)) * 2 - 1
        for part, net, given in (("decoder", vae.decoder, z), ("encoder", vae.encoder, x)):
            times, outputs = {}, {}
            for layout in ("channels_first", "channels_last"):
                net.channels_last = layout == "channels_last"
                with torch.inference_mode():
                    outputs[layout] = net(given)
                    times[layout] = median_seconds(lambda: net(given), args.repeats) / args.batch
            a, b = times["channels_first"], times["channels_last"]
            diff = (outputs["channels_first"] - outputs["channels_last"]).abs().max().item()
            print(f"| {name}: {part} | {1000 * a:.1f} | {1000 * b:.1f} | {a / b:.2f}x | {diff:.1e} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
