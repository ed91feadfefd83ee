"""The model contract: one registry of methods, each declaring every capability the commands read."""

from __future__ import annotations

import pytest

from cflow_ad import api
from cflow_ad.config import METHODS, NORMALIZATIONS, CFlowConfig
from cflow_ad.contract import CAPABILITIES, AnomalyModel
from cflow_ad.errors import CflowInputError
from cflow_ad.experiments import DETERMINISTIC
from cflow_ad.inference import RUNTIMES, exportable, load_runner
from cflow_ad.model import METHOD_CLASSES, build_model

SMALL = CFlowConfig(image_size=64, last_stride=16, pool_layers=2, coupling_layers=1, condition_dim=8)

# What each method can do, as the README and the commands describe it.
DECLARED = {
    "cflow": {"runtimes": ("torch", "onnx"), "normalizations": NORMALIZATIONS, "training_loop": True,
              "deterministic": False, "map_max_score": True, "quantizable": True, "paper_taps": (3, 16)},
    "padim": {"runtimes": ("torch", "onnx"), "normalizations": (), "training_loop": False, "deterministic": False,
              "map_max_score": True, "quantizable": False, "paper_taps": (3, 16)},
    "spade": {"runtimes": ("torch",), "normalizations": (), "training_loop": False, "deterministic": True,
              "map_max_score": False, "quantizable": False, "paper_taps": (3, 16)},
    "patchcore": {"runtimes": ("torch", "onnx"), "normalizations": (), "training_loop": False, "deterministic": False,
                  "map_max_score": False, "quantizable": False, "paper_taps": (2, 16)},
}


@pytest.fixture(scope="module")
def models() -> dict[str, AnomalyModel]:
    return {m: build_model(SMALL.replace(method=m), pretrained=False) for m in METHODS}


def test_the_registry_names_exactly_the_configs_methods():
    assert tuple(METHOD_CLASSES) == METHODS
    assert all(issubclass(kind, AnomalyModel) for kind in METHOD_CLASSES.values())


@pytest.mark.parametrize("method", METHODS)
def test_every_method_declares_every_capability(method):
    kind = METHOD_CLASSES[method]
    assert set(DECLARED[method]) == set(CAPABILITIES)
    assert {name: getattr(kind, name) for name in CAPABILITIES} == DECLARED[method]
    assert "torch" in kind.runtimes and set(kind.runtimes) <= set(RUNTIMES)
    assert set(kind.normalizations) <= set(NORMALIZATIONS)
    assert type(kind.training_loop) is bool and type(kind.deterministic) is bool and type(kind.map_max_score) is bool
    assert type(kind.quantizable) is bool


def test_a_model_class_missing_a_capability_is_refused_where_it_is_defined():
    with pytest.raises(TypeError, match="training_loop, deterministic"):
        type("Partial", (AnomalyModel,), {"runtimes": ("torch",), "normalizations": ()})


def test_capability_lists_come_from_the_declarations():
    assert DETERMINISTIC == ("spade",)


def test_build_model_returns_the_registered_class_without_thresholds(models):
    for method, model in models.items():
        assert type(model) is METHOD_CLASSES[method]
        assert model.config.method == method
        assert model.thresholds is None


def test_only_exportable_methods_pass_the_onnx_check(models, tmp_path):
    for method in ("cflow", "padim", "patchcore"):
        assert exportable(models[method]) is models[method]
    for attempt in (lambda: exportable(models["spade"]), lambda: load_runner(models["spade"], "onnx"),
                    lambda: api.export(models["spade"], tmp_path / "spade.onnx")):
        with pytest.raises(CflowInputError) as err:
            attempt()
        message = str(err.value)
        assert "\n" not in message and "SPADE runs in PyTorch only" in message and "--runtime torch" in message
        assert message.endswith("cflow, padim, patchcore")
    assert not (tmp_path / "spade.onnx").exists()


@pytest.mark.parametrize("method", ["padim", "spade", "patchcore"])
def test_paper_mode_is_refused_without_per_scale_maps(models, method):
    with pytest.raises(CflowInputError, match="paper normalisation needs CFLOW's per-scale maps"):
        api._check_mode(models[method], "paper")
    api._check_mode(models["cflow"], "paper")
