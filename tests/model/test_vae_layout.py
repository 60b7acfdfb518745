"""The decoder runs channels-last on a CPU (the encoder can) (oneDNN's layout; bench/decoder_layout.py): same image as channels-first,
returned in the usual layout, and the choice can be forced either way."""
import torch

from fluxion.model.autoencoder import AutoEncoder, AutoEncoderConfig


def tiny() -> AutoEncoder:
    torch.manual_seed(0)
    return AutoEncoder(AutoEncoderConfig(resolution=32, ch=8, ch_mult=(1, 2, 2), num_res_blocks=1, norm_groups=4)).eval()


def layouts_seen(vae: AutoEncoder, z: torch.Tensor) -> tuple[torch.Tensor, list[bool]]:
    seen = []
    hook = vae.decoder.conv_out.register_forward_pre_hook(
        lambda m, args: seen.append(args[0].is_contiguous(memory_format=torch.channels_last)))
    with torch.no_grad():
        out = vae.decode(z)
    hook.remove()
    return out, seen


def test_the_decoder_runs_channels_last_on_a_cpu_and_returns_the_same_image_channels_first():
    vae = tiny()
    z = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(1))
    auto, seen_auto = layouts_seen(vae, z)
    vae.decoder.channels_last = False
    first, seen_first = layouts_seen(vae, z)
    assert seen_auto == [True] and seen_first == [False]
    assert auto.is_contiguous() and auto.shape == (2, 3, 32, 32)
    torch.testing.assert_close(auto, first, rtol=0, atol=1e-5)
    assert first.abs().mean() > 0.01  # a real image, not zeros


def test_the_encoder_stays_channels_first_unless_asked_and_gives_the_same_latent_either_way():
    vae = tiny()
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(2)) * 2 - 1
    seen = []
    vae.encoder.conv_out.register_forward_pre_hook(
        lambda m, args: seen.append(args[0].is_contiguous(memory_format=torch.channels_last)))
    with torch.no_grad():
        first = vae.encode(x)  # the default: its rounding would travel through every sampling step
        vae.encoder.channels_last = True
        last = vae.encode(x)
    assert seen == [False, True]
    assert last.is_contiguous() and last.shape == (2, 16, 8, 8)
    torch.testing.assert_close(last, first, rtol=0, atol=1e-5)
    assert first.abs().mean() > 0.01


def test_the_layout_changes_no_weight():
    vae = tiny()
    before = {k: v.clone() for k, v in vae.state_dict().items()}
    vae.decode(torch.randn(1, 16, 8, 8))
    vae.encode(torch.randn(1, 3, 32, 32))
    assert all(torch.equal(before[k], v) and v.is_contiguous() for k, v in vae.state_dict().items())
