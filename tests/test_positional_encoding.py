import math

import pytest
import torch

from cflow_ad.positional_encoding import PositionalCondition, positional_encoding_2d


def test_values_follow_sin_cos_of_column_and_row():
    pe = positional_encoding_2d(8, 3, 5)  # 4 channels per axis, 2 frequencies: 1 and 1e-2
    assert pe.shape == (8, 3, 5)
    r, c = 2, 4
    expect = [math.sin(c), math.cos(c), math.sin(c / 100), math.cos(c / 100),
              math.sin(r), math.cos(r), math.sin(r / 100), math.cos(r / 100)]
    assert torch.allclose(pe[:, r, c], torch.tensor(expect), atol=1e-6)


def test_every_location_is_unique():
    pe = positional_encoding_2d(128, 32, 32).flatten(1).T
    assert torch.unique(pe.round(decimals=5), dim=0).shape[0] == 32 * 32


def test_channels_must_be_multiple_of_four():
    with pytest.raises(ValueError):
        positional_encoding_2d(126, 4, 4)


def test_positional_condition_factors_equal_the_dense_encoding_and_its_projection():
    pc = PositionalCondition(16, 3, 5)
    dense = positional_encoding_2d(16, 3, 5).flatten(1).T  # row-major locations
    assert pc.shape == (15, 16)
    assert torch.equal(pc.dense(), dense)
    lin = torch.nn.Linear(16, 7)
    assert torch.allclose(pc.project(lin), lin(dense), atol=1e-6)
    lin_nobias = torch.nn.Linear(16, 7, bias=False)
    assert torch.allclose(pc.project(lin_nobias), lin_nobias(dense), atol=1e-6)
