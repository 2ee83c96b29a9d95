"""Baseline architectures: exact sizes, their defining blocks, and MONAI's peers.

The registry tests in test_models.py (odd sizes, backward, batch independence, channels_last)
run on these models too.
"""

from __future__ import annotations

import sys

import pytest
import torch

from nerveseg.errors import ConfigError
from nerveseg.models import count_parameters, create
from nerveseg.models.attention_unet import AttentionGate
from nerveseg.models.multires_unet import MultiResBlock, multires_widths

torch.manual_seed(0)

SMALL = (8, 16, 32, 64, 128)


@pytest.mark.parametrize(
    "name, kwargs, expected",
    [
        ("unet_pp", {}, 9_045_249),  # Keras Nest_Net 9,041,601 + 3,648 (BN shift+scale for conv bias)
        ("unet_pp", {"deep_supervision": True}, 9_045_348),  # + three 1x1 heads of 33
        ("attention_unet", {}, 7_850_713),  # unet 7,762,465 + 88,248 in four gates
        ("multires_unet", {}, 7_244_528),  # Keras trainable 7,237,982 + 6,546 BN scales
    ],
)
def test_exact_parameter_counts(name, kwargs, expected):
    assert count_parameters(create(name, **kwargs)) == expected


def test_parameter_counts_near_the_references():
    assert count_parameters(create("unet_pp")) == pytest.approx(9.04e6, rel=0.25)  # UNet++ paper/Keras
    assert count_parameters(create("multires_unet")) == pytest.approx(7.24e6, rel=0.15)  # authors' Keras


@pytest.mark.parametrize("name", ["unet", "unet_pp", "attention_unet", "multires_unet"])
def test_sa_unet_is_at_least_ten_times_smaller(name):
    assert count_parameters(create(name)) >= 10 * count_parameters(create("sa_unet"))


def test_multires_widths_by_hand():
    # U = 32: W = 1.67 * 32 = 53.44; 0.167 W = 8.92, 0.333 W = 17.80, 0.5 W = 26.72
    assert multires_widths(32) == (8, 17, 26)
    assert multires_widths(64) == (17, 35, 53)  # W = 106.88
    assert multires_widths(512) == (142, 284, 427)  # authors' 0.333 W = 284.7 (W/3 would give 285)
    block = MultiResBlock(3, 32)
    assert block.out_channels == 51
    assert [conv[0].out_channels for conv in block.convs] == [8, 17, 26]
    assert block(torch.randn(2, 3, 9, 11)).shape == (2, 51, 9, 11)


def test_multires_unet_uses_u_filters_on_res_paths():
    model = create("multires_unet")
    assert [len(path) for path in model.res_paths] == [4, 3, 2, 1]
    assert [path[-1].norm.num_features for path in model.res_paths] == [32, 64, 128, 256]
    assert model.encoder[0].out_channels == 51 and model.head.in_channels == 51


def test_attention_gate_coefficients_and_multiplication():
    gate = AttentionGate(16, 16, 8).eval()
    x, g = torch.randn(2, 16, 13, 7), torch.randn(2, 16, 13, 7)
    with torch.no_grad():
        alpha = gate.attention(x, g)
        assert alpha.shape == (2, 1, 13, 7)
        assert (alpha > 0).all() and (alpha < 1).all()
        torch.testing.assert_close(gate(x, g), x * alpha)
        gate.psi[1].bias.fill_(-1e4)  # psi's output shift: the gate closes
        assert gate(x, g).abs().max() < 1e-6
        gate.psi[1].bias.fill_(1e4)  # ... or opens fully
        torch.testing.assert_close(gate(x, g), x)


def test_attention_unet_gates_its_skips():
    model = create("attention_unet", features=SMALL).eval()
    x = torch.randn(1, 1, 48, 32)
    outputs = []
    hooks = [gate.register_forward_hook(lambda m, inp, out: outputs.append((inp[0].shape, out))) for gate in model.gates]
    with torch.no_grad():
        open_logits = model(x)
        assert [out.shape for _, out in outputs] == [s for s, _ in outputs]  # gated skip keeps its size
        assert [out.shape[1] for _, out in outputs] == [64, 32, 16, 8]
        outputs.clear()
        for gate in model.gates:
            gate.psi[1].bias.fill_(-1e4)
        closed_logits = model(x)
    for hook in hooks:
        hook.remove()
    assert all(out.abs().max() < 1e-6 for _, out in outputs)
    assert not torch.allclose(open_logits, closed_logits)


@pytest.mark.parametrize("deep_supervision, heads", [(False, 1), (True, 4)])
def test_unet_pp_deep_supervision_gives_one_logit_map(deep_supervision, heads):
    model = create("unet_pp", features=SMALL, deep_supervision=deep_supervision)
    for train in (True, False):
        model.train(train)
        assert model(torch.randn(2, 1, 37, 53)).shape == (2, 1, 37, 53)
    model.eval()
    x = torch.randn(2, 1, 32, 48)  # already divisible: forward == forward_padded
    with torch.no_grad():
        logits = model.head_logits(x)
        assert len(logits) == heads and all(h.shape == (2, 1, 32, 48) for h in logits)
        torch.testing.assert_close(model(x), torch.stack(logits).mean(dim=0))


def test_unet_pp_nodes_are_nested():
    model = create("unet_pp", features=SMALL)
    # X^{i,j} takes j same-level features plus one up-convolved: (j + 1) * width channels
    assert model.nodes["0_4"][0][0].in_channels == 5 * 8
    assert model.nodes["1_2"][0][0].in_channels == 3 * 16
    assert len(model.nodes) == 15 and len(model.ups) == 10


@pytest.mark.parametrize(
    "name, expected", [("monai_unet_pp", 9_118_657), ("monai_attention_unet", 7_939_745)]
)
def test_monai_peers_odd_sizes_and_counts(name, expected):
    pytest.importorskip("monai", reason="MONAI (a test extra: pip install monai) is not installed")
    assert count_parameters(create(name)) == expected
    model = create(name, features=SMALL)
    for shape in [(2, 1, 37, 53), (1, 1, 45, 17)]:
        assert model(torch.randn(shape)).shape == (shape[0], 1, shape[2], shape[3])


@pytest.mark.parametrize("name", ["monai_unet_pp", "monai_attention_unet"])
def test_monai_peers_say_what_to_install(name, monkeypatch):
    for module in [m for m in sys.modules if m == "monai" or m.startswith("monai.")]:
        monkeypatch.delitem(sys.modules, module)
    monkeypatch.setitem(sys.modules, "monai", None)  # import monai -> ImportError
    with pytest.raises(ConfigError, match="pip install monai"):
        create(name, features=SMALL)
