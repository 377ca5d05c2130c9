import math

import torch

from mnistdist.model import MLP


def test_shapes_and_parameter_count():
    model = MLP()
    assert model(torch.zeros(7, 1, 28, 28)).shape == (7, 10)
    assert model(torch.zeros(7, 784)).shape == (7, 10)
    shapes = [tuple(p.shape) for p in model.parameters()]
    assert shapes == [(200, 784), (200,), (200, 200), (200,), (10, 200), (10,)]


def test_kaiming_normal_weights_and_zero_biases():
    torch.manual_seed(0)
    model = MLP()
    for layer in (model.fc1, model.fc2, model.fc3):
        fan_in = layer.weight.shape[1]
        expected_std = math.sqrt(2.0 / fan_in)
        assert abs(layer.weight.std().item() / expected_std - 1) < 0.05
        assert abs(layer.weight.mean().item()) < 0.05 * expected_std * 10
        assert torch.count_nonzero(layer.bias) == 0


def test_final_relu_only_when_asked():
    torch.manual_seed(0)
    plain, relu = MLP(final_relu=False), MLP(final_relu=True)
    relu.load_state_dict(plain.state_dict())
    x = torch.randn(64, 784)
    assert (plain(x) < 0).any()
    assert torch.equal(relu(x), torch.relu(plain(x)))


def test_reset_parameters_redraws_weights_and_zeroes_biases():
    torch.manual_seed(0)
    model = MLP()
    first = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(0.5)
    model.reset_parameters()
    for name, p in model.named_parameters():
        if name.endswith("bias"):
            assert torch.count_nonzero(p) == 0, name
        else:
            assert not torch.equal(p, first[name]) and (p != 0.5).all(), f"{name} was not re-drawn"
            expected_std = math.sqrt(2.0 / p.shape[1])
            assert abs(p.std().item() / expected_std - 1) < 0.1, name


def test_float32_batches_into_a_float64_model():
    """model.dtype=float64 trains on the same float32 batches: forward converts them (exactly)."""
    torch.manual_seed(0)
    model = MLP().to(torch.float64)
    x = torch.randn(5, 1, 28, 28)
    out = model(x)
    assert out.dtype == torch.float64
    assert torch.equal(out, model(x.to(torch.float64)))
