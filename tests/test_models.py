import pytest
import torch
from torch import nn

from fedsim.errors import ConfigError
from fedsim.models import build_model
from fedsim.models.inspect import first_layer


@pytest.mark.parametrize("name,shape", [("fc", (3, 16, 16)), ("fc", (20,)), ("lenet", (3, 32, 32)),
                                        ("lenet_relu", (1, 28, 28)), ("cnn", (3, 32, 32)), ("cnn", (1, 8, 8)),
                                        ("resnet18", (3, 32, 32))])
def test_models_map_a_batch_to_class_logits(name, shape):
    model = build_model({"name": name}, shape, 7, seed=0)
    assert model(torch.randn(2, *shape)).shape == (2, 7)


def test_initialisation_depends_on_the_seed_only():
    a, b, c = (build_model({"name": "cnn"}, (3, 32, 32), 10, seed=s) for s in (1, 1, 2))
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert not torch.equal(next(a.parameters()), next(c.parameters()))


def test_fc_first_layer_is_linear_then_relu_on_the_flattened_input():
    model = build_model({"name": "fc", "widths": [50, 20]}, (3, 8, 8), 10)
    layer = first_layer(model)
    assert isinstance(layer.module, nn.Linear) and layer.module.in_features == 192
    assert layer.activation == "relu" and layer.input_reshaped_only
    assert [m.out_features for m in model.modules() if isinstance(m, nn.Linear)] == [50, 20, 10]


def test_lenet_is_dlg_sigmoid_lenet_with_uniform_init():
    model = build_model({"name": "lenet"}, (3, 32, 32), 100)
    layer = first_layer(model)
    assert isinstance(layer.module, nn.Conv2d) and layer.activation == "sigmoid"
    assert all(float(p.abs().max()) <= 0.5 for p in model.parameters())
    assert model.fc.in_features == 768


def test_image_models_refuse_vector_data():
    with pytest.raises(ConfigError, match="model.name='cnn'"):
        build_model({"name": "cnn"}, (64,), 10)
