"""Architectures: the SAConv's defining properties, the registry contract, sizes and counts."""

from __future__ import annotations

import math

import pytest
import torch

from nerveseg.errors import ConfigError
from nerveseg.models import ECA, SAConv, count_gflops, count_parameters, create, eca_kernel_size, list_models

torch.manual_seed(0)


def _affine_parts(conv: SAConv, x: torch.Tensor) -> list[torch.Tensor]:
    """F_k(x) - F_k(0): the linear part of each cascade output (biases make them affine)."""
    with torch.no_grad():
        return [a - b for a, b in zip(conv.scales(x), conv.scales(torch.zeros_like(x)))]


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5])
def test_impulse_support_of_each_scale_is_2n_minus_1(n):
    conv = SAConv(3, 4 * n, n=n).eval()
    x = torch.zeros(1, 3, 21, 21)
    x[0, :, 10, 10] = 1.0
    for k, response in enumerate(_affine_parts(conv, x), start=1):
        support = (response.abs().sum(dim=(0, 1)) > 1e-7).nonzero()
        rows = support[:, 0].max() - support[:, 0].min() + 1
        cols = support[:, 1].max() - support[:, 1].min() + 1
        assert (rows.item(), cols.item()) == (2 * k - 1, 2 * k - 1), f"F_{k}"
        assert support[:, 0].min().item() == 10 - (k - 1)  # centred on the impulse


def test_cascade_is_linear_before_attention():
    conv = SAConv(5, 16, n=4)
    x, y = torch.randn(2, 5, 12, 13), torch.randn(2, 5, 12, 13)
    a, b = 1.7, -0.6
    lhs = _affine_parts(conv, a * x + b * y)
    fx, fy = _affine_parts(conv, x), _affine_parts(conv, y)
    for out, ox, oy in zip(lhs, fx, fy):
        torch.testing.assert_close(out, a * ox + b * oy, rtol=1e-4, atol=1e-5)


def test_cascade_has_no_normalisation_or_activation_inside():
    conv = SAConv(8, 32, n=4)
    kinds = {type(m).__name__ for m in conv.cascade.modules()}
    assert kinds <= {"ModuleList", "Sequential", "Conv2d"}
    assert conv.cascade[0].kernel_size == (1, 1)
    for h in conv.cascade[1:]:
        dw, pw = h
        assert dw.kernel_size == (3, 3) and dw.groups == dw.in_channels == 8
        assert pw.kernel_size == (1, 1)


@pytest.mark.parametrize(
    "channels, expected",
    # t = log2(C)/2 + 1/2 -> nearest odd, ties up, at least 3 (hand-computed)
    [(1, 3), (4, 3), (16, 3), (32, 3), (64, 3), (128, 5), (256, 5), (512, 5), (1024, 5), (2048, 7), (8192, 7), (2**14, 7), (2**16, 9)],
)
def test_eca_kernel_rule(channels, expected):
    assert eca_kernel_size(channels) == expected


def test_eca_matches_reference_formula_and_gates():
    for c in range(1, 5000, 37):
        t = int(abs(math.log2(c) / 2 + 0.5))  # ECA-Net reference implementation
        assert eca_kernel_size(c) == max(3, t if t % 2 else t + 1)
    eca = ECA(64)
    x = torch.randn(2, 64, 5, 5)
    w = eca.attention(x)
    assert w.shape == (2, 64, 1, 1) and (w > 0).all() and (w < 1).all()
    torch.testing.assert_close(eca(x), x * w)
    assert sum(p.numel() for p in eca.parameters()) == 3


def test_saconv_rejects_indivisible_width():
    with pytest.raises(ValueError, match="divisible"):
        SAConv(3, 30, n=4)


def test_parameter_counts():
    # exact counts of our reconstruction (paper: SA-UNet 491K; their U-Net 9.4M)
    assert count_parameters(create("sa_unet")) == 455_603
    assert count_parameters(create("unet")) == 7_762_465
    assert count_parameters(create("unet")) / count_parameters(create("sa_unet")) > 15


def test_gflops_are_counted():
    sa, unet = count_gflops(create("sa_unet"), 512, 512), count_gflops(create("unet"), 512, 512)
    assert 5 < sa < 9 and 80 < unet < 110
    # FLOPs scale with pixels
    assert count_gflops(create("sa_unet"), 256, 256) == pytest.approx(sa / 4, rel=1e-3)  # ECA is size-free


def test_registry_rejects_unknown_names_and_arguments():
    with pytest.raises(ConfigError, match="sa_unet"):
        create("segformer")
    with pytest.raises(ConfigError, match="bad arguments"):
        create("sa_unet", nonsense=3)
    assert {"sa_unet", "unet"} <= set(list_models())


@pytest.mark.parametrize("name", list_models())
@pytest.mark.parametrize("shape", [(1, 1, 64, 64), (2, 1, 37, 53), (1, 1, 45, 17)])
def test_any_input_size_gives_same_size_logits(name, shape):
    model = create(name, features=(8, 16, 32, 64, 128))
    out = model(torch.randn(shape))
    assert out.shape == (shape[0], 1, shape[2], shape[3])
    out.mean().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("name", list_models())
def test_padding_does_not_leak_between_batch_items_and_predict_is_probability(name):
    torch.manual_seed(0)  # unseeded weights and inputs put MONAI's attention U-Net 1.3e-5 over atol once in a full run
    model = create(name, features=(8, 16, 32, 64, 128)).eval()
    x = torch.randn(2, 1, 33, 47)
    with torch.no_grad():
        both = model(x)
        first = model(x[:1])
    torch.testing.assert_close(both[:1], first, rtol=1e-4, atol=1e-5)
    p = model.predict(x)
    assert p.min() >= 0 and p.max() <= 1


@pytest.mark.parametrize("name", list_models())
def test_channels_last_gives_the_same_function(name):
    model = create(name, features=(8, 16, 32, 64, 128)).eval()
    x = torch.randn(1, 1, 48, 64)
    with torch.no_grad():
        ref = model(x)
        model = model.to(memory_format=torch.channels_last)
        out = model(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
