"""The model family: the lecture's exact network, every architecture's shapes, and the
properties each paper's block is built for (stochastic depth's expectation, looks-linear
affinity, highway carry at init, shortcut options)."""

import pytest
import torch

from resserve.train.config import ARCHITECTURES, ConfigError, ModelConfig
from resserve.train.models import PreActBlock, build_model, count_parameters, lecture_config


def test_lecture_resnet_has_117802_parameters_and_the_lecture_module_names():
    model = build_model(lecture_config())
    assert count_parameters(model) == 117_802
    names = dict(model.named_modules())
    for name in ("conv0", "resblocks", "resblocks.0.conv1", "resblocks.0.bn1", "resblocks.24.conv2",
                 "resblocks.24.bn2", "avg", "fc"):
        assert name in names
    assert len(model.resblocks) == 25
    assert names["avg"].kernel_size == 28


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
@pytest.mark.parametrize("batch", [1, 7])
def test_every_architecture_maps_images_to_ten_logits(arch, batch):
    model = build_model(ModelConfig(arch=arch, blocks=3, widths=(8,))).eval()
    assert model(torch.rand(batch, 1, 28, 28)).shape == (batch, 10)


@pytest.mark.parametrize("arch", ["resnet", "plain", "preact", "highway", "crelu"])
@pytest.mark.parametrize("shortcut", ["A", "B"])
def test_downsampling_stages_halve_the_map_and_raise_channels(arch, shortcut):
    model = build_model(ModelConfig(arch=arch, blocks=2, widths=(8, 16, 32), shortcut=shortcut)).eval()
    features = model.resblocks(model.act(model.conv0(model.normalize(torch.rand(7, 1, 28, 28)))))
    widen = 2 if arch == "crelu" else 1
    assert features.shape == (7, widen * 32, 7, 7)
    assert model(torch.rand(7, 1, 28, 28)).shape == (7, 10)


def test_option_a_adds_no_parameters_and_option_b_a_1x1_projection_per_downsampling():
    a = count_parameters(build_model(ModelConfig(blocks=2, widths=(8, 16, 32), shortcut="A")))
    b = count_parameters(build_model(ModelConfig(blocks=2, widths=(8, 16, 32), shortcut="B")))
    projection = lambda c_in, c_out: c_in * c_out + 2 * c_out  # 1x1 conv (no bias) + BN affine
    assert b - a == projection(8, 16) + projection(16, 32)


def test_option_a_shortcut_subsamples_and_zero_pads():
    from resserve.train.models import ShortcutA

    x = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).view(2, 3, 4, 4)
    y = ShortcutA(3, 5, stride=2)(x)
    assert y.shape == (2, 5, 2, 2)
    assert torch.equal(y[:, :3], x[:, :, ::2, ::2])
    assert torch.count_nonzero(y[:, 3:]) == 0


def test_stochastic_depth_eval_output_is_the_mean_of_training_outputs():
    torch.manual_seed(0)
    block = PreActBlock(8, 8, 3, drop_prob=0.5).eval()  # BN uses running stats
    block.drop.train()  # only the branch drop is random
    x = torch.randn(4, 8, 6, 6)
    with torch.no_grad():
        samples = torch.stack([block(x) for _ in range(4000)])
        block.drop.eval()
        expected = block(x)
    assert not torch.allclose(samples[0], expected, atol=1e-3)  # training mode really drops
    assert torch.allclose(samples.mean(0), expected, atol=0.05 * expected.abs().max())


def test_survival_probability_decays_linearly_to_p_L():
    model = build_model(ModelConfig(blocks=4, survival_prob=0.5))
    drops = [block.drop.p for block in model.resblocks]
    assert drops == pytest.approx([0.125, 0.25, 0.375, 0.5])


def test_crelu_looks_linear_network_is_affine_at_initialization():
    torch.manual_seed(0)
    model = build_model(ModelConfig(arch="crelu", blocks=10, widths=(8,))).double().eval()
    x, y = torch.rand(3, 1, 28, 28, dtype=torch.float64), torch.rand(3, 1, 28, 28, dtype=torch.float64)
    zero = torch.zeros_like(x)
    for a, b in [(0.3, 0.5), (2.0, -1.5), (-0.7, 0.2)]:
        with torch.no_grad():
            combined = model(a * x + b * y)
            expected = a * model(x) + b * model(y) + (1 - a - b) * model(zero)
        assert torch.allclose(combined, expected, rtol=1e-9, atol=1e-9)


def test_plain_relu_network_is_not_affine_at_initialization():
    torch.manual_seed(0)
    model = build_model(ModelConfig(arch="plain", blocks=4, widths=(8,))).double().eval()
    x, y = torch.rand(3, 1, 28, 28, dtype=torch.float64), torch.rand(3, 1, 28, 28, dtype=torch.float64)
    with torch.no_grad():
        assert not torch.allclose(model(2 * x - y), 2 * model(x) - model(y) + model(torch.zeros_like(x)), atol=1e-6)


def test_highway_gates_start_nearly_closed():
    model = build_model(ModelConfig(arch="highway", blocks=3, widths=(8,))).eval()
    x = model.act(model.conv0(model.normalize(torch.rand(5, 1, 28, 28))))
    gate = model.resblocks[0].transform_gate(x)
    assert gate.mean() < 0.1


def test_zero_init_residual_makes_resnet_blocks_identity_plus_relu():
    model = build_model(ModelConfig(blocks=3, widths=(8,), zero_init_residual=True)).eval()
    x = torch.relu(torch.randn(2, 8, 28, 28))
    assert torch.allclose(model.resblocks(x), x)


@pytest.mark.parametrize("fields, message", [
    ({"kernel_size": 4}, "odd"),
    ({"kernel_size": 0}, "odd"),
    ({"widths": (16, 0)}, "positive"),
    ({"blocks": -1}, ">= 0"),
    ({"arch": "vgg"}, "unknown architecture"),
    ({"shortcut": "C"}, "shortcut"),
    ({"survival_prob": 0.0}, "survival"),
    ({"arch": "highway", "survival_prob": 0.5}, "stochastic depth"),
])
def test_invalid_configs_are_refused(fields, message):
    with pytest.raises(ConfigError, match=message):
        ModelConfig(**fields)


def test_zero_blocks_is_a_valid_network():
    assert build_model(ModelConfig(blocks=0))(torch.rand(2, 1, 28, 28)).shape == (2, 10)


def test_config_round_trips_through_a_dict():
    config = ModelConfig(arch="preact", blocks=2, widths=(8, 16), shortcut="B", survival_prob=0.8)
    assert ModelConfig.from_dict(config.to_dict()) == config
