"""Hostile or broken model files (issue 33): every one is refused on load with one line naming the file,
before it costs memory, runs code or scores a single image."""

from __future__ import annotations

import json

import pytest

from cflow_ad.config import CFlowConfig
from cflow_ad.errors import CflowInputError


@pytest.mark.parametrize("changes,needle", [
    ({"coupling_layers": 100000}, "coupling_layers must be from 1 to 64"),
    ({"coupling_layers": None}, "coupling_layers must be an integer"),
    ({"pool_layers": "3"}, "pool_layers must be an integer"),
    ({"clamp_alpha": float("nan")}, "clamp_alpha"),
    ({"lr": float("inf")}, "lr"),
    ({"condition_dim": 1 << 20}, "condition_dim"),
    ({"batch_size": 10**9}, "batch_size"),
    ({"blur_sigma": 1e9}, "blur_sigma"),
    ({"image_size": [1 << 20, 32]}, "image_size"),
    ({"conditional": "yes"}, "conditional must be true or false"),
    ({"weights": 7}, "weights must be a string"),
])
def test_config_fields_have_types_and_sane_bounds(changes, needle):
    data = {**json.loads(CFlowConfig().to_json()), **changes}
    with pytest.raises(CflowInputError, match=needle) as err:
        CFlowConfig.from_dict(data)
    assert "\n" not in str(err.value)


def test_a_config_that_is_not_an_object_is_a_clear_error():
    with pytest.raises(CflowInputError, match="expected an object of options, got list"):
        CFlowConfig.from_dict([1, 2])
