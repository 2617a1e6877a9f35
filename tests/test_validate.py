"""The validator refuses every layer that would break the DP guarantee, with a typed error."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import zoo
from zoo.dp.grad_sample import MissingPerSampleGradientError
from zoo.nn.layers import get_norm_layer
from zoo.dp.validate import BatchStatisticsError, NoPerSampleGradientError, RunningBufferError, validate_model


def _net(*layers):
    return nn.Sequential(nn.Conv2d(3, 8, 3), *layers, nn.Flatten(), nn.LazyLinear(2))


def test_batchnorm_refused():
    with pytest.raises(BatchStatisticsError, match="over the batch"):
        validate_model(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)))


def test_escnn_batchnorm_refused():
    from escnn import gspaces
    from escnn import nn as enn

    ftype = enn.FieldType(gspaces.rot2dOnR2(4), [gspaces.rot2dOnR2(4).regular_repr] * 2)
    with pytest.raises(BatchStatisticsError, match="InnerBatchNorm"):
        validate_model(nn.Sequential(enn.InnerBatchNorm(ftype)))


def test_running_buffers_refused():
    with pytest.raises(RunningBufferError, match="running"):
        validate_model(nn.Sequential(nn.InstanceNorm2d(8, track_running_stats=True)))


class Scale(nn.Module):
    def __init__(self):
        super().__init__()
        self.s = nn.Parameter(torch.ones(1))

    def forward(self, x):
        return x * self.s


def test_layer_without_per_sample_gradient_refused():
    with pytest.raises(NoPerSampleGradientError, match="register_grad_sampler"):
        validate_model(nn.Sequential(nn.Linear(3, 3), Scale()))
    validate_model(nn.Sequential(nn.Linear(3, 3), Scale().requires_grad_(False)))  # frozen: fine


def test_all_problems_listed():
    with pytest.raises(BatchStatisticsError) as e:
        validate_model(nn.Sequential(nn.BatchNorm1d(3), Scale()))
    assert len(e.value.problems) == 2


def test_norm_factory_refuses_batchnorm():
    with pytest.raises(ValueError, match="per-sample"):
        get_norm_layer("batchnorm")
    gn = get_norm_layer("groupnorm")(64)
    assert isinstance(gn, nn.GroupNorm) and gn.num_groups == 16


class Tied(nn.Module):
    """A registered layer whose parameter is used functionally: its hooks never fire."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 3)
        self.num_classes, self.in_chans = 3, 4

    def forward(self, x):
        return nn.functional.linear(x.flatten(1), self.lin.weight, self.lin.bias)


def test_parameter_without_per_sample_gradient_is_a_privacy_bug():
    with pytest.raises(MissingPerSampleGradientError, match="lin.weight"):
        zoo.per_sample_gradients(Tied(), torch.randn(2, 4), torch.tensor([0, 1]), loss_fn=lambda o, t:
                                 nn.functional.cross_entropy(o, t, reduction="none"))
