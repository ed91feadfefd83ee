"""CUDA's rules on a machine without a GPU (issue 34): every method, in every scoring mode it has, loaded as a
GPU loads a checkpoint and run on PyTorch's meta device, this suite's stand-in for a GPU; the decoder
training's per-step pieces and PatchCore's coreset selection there too; and every explicit device request
for onnxruntime runs on that device or is refused in one line.

Meta refuses part of what CUDA refuses: a non-scalar CPU tensor in an elementwise op or a concatenation, and
host reads (.item(), bool() of a tensor, .cpu(), data-dependent shapes). It lets through a CPU tensor in a
matrix product, a convolution, an index_select or a gather, and a CPU torch.Generator drawing a meta tensor,
all of which CUDA refuses. `CudaRules` refuses every one of them, named, and the first test shows it does.
"""

from __future__ import annotations

import itertools
import warnings

import pytest
import torch
from safetensors.torch import load_file
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from cflow_ad import api
from cflow_ad.baselines import k_center_greedy
from cflow_ad.checkpoint import read_metadata
from cflow_ad.config import METHODS, CFlowConfig
from cflow_ad.data import make_synthetic_mvtec
from cflow_ad.device import check_provider, onnx_providers
from cflow_ad.errors import CflowInputError
from cflow_ad.inference import load_runner
from cflow_ad.model import METHOD_CLASSES, build_model
from cflow_ad.scoring import anomaly_maps
from cflow_ad.source import DataSource
from cflow_ad.training import fiber_loss, location_chunks

from .conftest import TINY

DEVICE = torch.device("meta")  # stands in for a GPU: it holds shapes and devices, never values
SMALL = TINY.replace(image_size=64, coupling_layers=1, sub_epochs=1, fiber_batch=64)  # 8x8 and 4x4 maps
aten = torch.ops.aten
TRANSFERS = {aten._to_copy.default, aten.copy_.default}  # explicit copies between host and device
# advanced indexing takes CPU indices on a CUDA tensor (it copies them over)
INDEXING = {aten.index.Tensor, aten.index_put.default, aten.index_put_.default, aten._index_put_impl_.default}
# .item(), bool(), int() and float() of a tensor; boolean masks and torch.where(condition)
HOST_READS = {aten._local_scalar_dense.default, aten.nonzero.default}


class BrokenRule(AssertionError):
    """A device op that CUDA would refuse, or a host read that would wait for the GPU."""


class CudaRules(TorchDispatchMode):
    """Every aten op run inside is checked before it runs: no host read of a device tensor, no non-scalar CPU
    tensor beside a device tensor (copies and indexing aside, which CUDA allows), and no CPU generator
    drawing device values."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        leaves = pytree.tree_leaves((args, kwargs))
        tensors = [t for t in leaves if isinstance(t, torch.Tensor)]
        on_device = [t.device == DEVICE for t in tensors]
        targets = {t.device for t in tensors} | ({torch.device(kwargs["device"])} if kwargs.get("device") else set())
        if func in HOST_READS and any(on_device):
            raise BrokenRule(f"{func} reads a device tensor on the host: the host waits for the GPU")
        if func in TRANSFERS and any(on_device) and torch.device(kwargs.get("device") or tensors[0].device) != DEVICE:
            raise BrokenRule(f"{func} copies a device tensor to the host: the host waits for the GPU")
        if func not in TRANSFERS | INDEXING and any(on_device):
            host = [tuple(t.shape) for t in tensors if t.device.type == "cpu" and t.dim() > 0]
            if host:
                raise BrokenRule(f"{func} mixes device tensors with CPU tensors of shapes {host}")
        for gen in (g for g in leaves if isinstance(g, torch.Generator)):
            if DEVICE in targets and gen.device != DEVICE:
                raise BrokenRule(f"{func} draws device values from a {gen.device} generator")
        return func(*args, **kwargs)


def images(config: CFlowConfig, batch: int = 2) -> torch.Tensor:
    return torch.rand(batch, 3, *config.image_size, device=DEVICE)


def load_on_device(path) -> torch.nn.Module:
    """The checkpoint's model as a GPU run loads it: built, moved to the device, then given the file's state
    (as training's resume does; a buffer that fitting sizes must be recreated there, not on the CPU)."""
    config = CFlowConfig.from_dict(read_metadata(path)["config"])
    model = build_model(config, pretrained=False).to(DEVICE)
    with warnings.catch_warnings(), CudaRules():
        warnings.filterwarnings("ignore", "for .*meta parameter")  # copying into a meta tensor: nothing to copy
        model.load_state_dict(load_file(str(path)))
    stray = [name for name, t in itertools.chain(model.named_parameters(), model.named_buffers()) if t.device != DEVICE]
    assert not stray, f"loading left {', '.join(stray)} off the device"
    return model.eval()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """method -> a tiny checkpoint of it, trained on the CPU on 8 images of 64 px and written by the checkpoint
    module, once each."""
    source = DataSource(make_synthetic_mvtec(tmp_path_factory.mktemp("data"), n_train=8, n_test_good=1,
                                             n_test_defect=1, size=64, seed=0), "synthetic")
    paths = {}

    def trained(method: str):
        if method not in paths:
            paths[method] = api.train(SMALL.replace(method=method), tmp_path_factory.mktemp(method), source,
                                      progress=False, log=lambda m: None, device="cpu")
        return paths[method]

    return trained


class _Breaks(torch.nn.Module):
    """A forward that breaks one of CUDA's rules."""

    def __init__(self, rule: str):
        super().__init__()
        self.rule = rule

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cpu = torch.ones(3, 3)
        return {
            "a CPU tensor in an elementwise op": lambda: x + cpu[0],  # meta refuses it too
            "a CPU tensor in a matrix product": lambda: x @ cpu,  # meta computes it
            "a CPU index in index_select": lambda: x.index_select(1, torch.tensor([0, 2])),  # meta computes it
            "a CPU generator": lambda: x + torch.randn(3, device=x.device, generator=torch.Generator()),  # meta too
            "a host read": lambda: x * float(x.max()),
            "a branch on a value": lambda: x if x.isfinite().all() else -x,
            "a copy to the host": lambda: x.cpu().to(x.device),
        }[self.rule]()


@pytest.mark.parametrize("rule", ["a CPU tensor in an elementwise op", "a CPU tensor in a matrix product",
                                  "a CPU index in index_select", "a CPU generator", "a host read",
                                  "a branch on a value", "a copy to the host"])
def test_the_guard_refuses_what_cuda_refuses(rule):
    module = _Breaks(rule)
    with CudaRules(), pytest.raises(BrokenRule):
        module(torch.rand(2, 3, device=DEVICE))
    module(torch.rand(2, 3))  # each one runs on the CPU


@pytest.mark.parametrize("method", METHODS)
def test_every_scoring_mode_runs_on_the_device(method, checkpoint):
    """What test, predict, calibrate and serve run per batch: the checkpoint's own mode, `model(x)`; each other
    mode the model's maps differ in, `model(x, mode)`; and paper mode's per-batch part, the log-density maps
    and the maps from the set's constants (refs on the device, the offset a host scalar, as
    `scoring.paper_constants` returns them after its one host read per set)."""
    model = load_on_device(checkpoint(method))
    x = images(model.config)
    with torch.no_grad(), CudaRules():
        out = [model(x)] + [model(x, mode) for mode in model.normalizations if mode != "paper"]
        if "paper" in model.normalizations:
            logs = model.log_density_maps(model.features(x))
            refs, offset = torch.stack([lm.max() for lm in logs]), torch.tensor(2.0)
            out.append(anomaly_maps(logs, refs, offset, model.image_size, "paper", model.config.blur_sigma))
    assert len(out) == 1 + len(model.normalizations)
    for amap, score in out:
        assert amap.device == score.device == DEVICE
        assert amap.shape == (2, *model.image_size) and score.shape == (2,)


@pytest.mark.parametrize("method", [m for m in METHODS if METHOD_CLASSES[m].training_loop])
def test_the_decoder_training_pieces_run_on_the_device(method, checkpoint):
    """Per image batch and per step, short of `training._Run.step` itself: the fibers (whitened), their location
    chunks (shuffled with training's CPU generator), the differentiable log-likelihood, its loss and gradients."""
    model = load_on_device(checkpoint(method)).train()
    gen = torch.Generator().manual_seed(0)
    with CudaRules():
        for k, f in enumerate(model.features(images(model.config, 4))):
            fibers, log_det = model.fibers(k, f)
            for chunk in location_chunks(fibers, model.config.fiber_batch, gen):
                lp = model.log_likelihood(k, chunk, log_det, tuple(f.shape[-2:]), model.decoders[k].log_prob)
                assert lp.device == DEVICE and lp.shape == chunk.shape[:-1]
                fiber_loss(lp, model.config.loss).backward()
    grads = [p.grad for p in model.decoders.parameters() if p.requires_grad]
    assert grads and all(g is not None and g.device == DEVICE for g in grads)


def test_the_coreset_selection_runs_on_the_device():
    """PatchCore's greedy selection keeps each pick on the device: no host read per pick."""
    points = torch.empty(1000, 16, device=DEVICE)
    with CudaRules():
        picks = k_center_greedy(points, 20, start=3)
    assert picks.device == DEVICE and picks.shape == (20,) and picks.dtype == torch.long


def test_onnxruntime_runs_on_an_explicit_gpu_or_refuses_in_one_line(checkpoint, tmp_path, monkeypatch):
    """Issue 34: `--runtime onnx --device cuda` ran on onnxruntime's CPU provider where it had no CUDA one, and
    said cuda. `auto` takes the CPU's quietly; an explicit GPU without CUDA's provider is refused, and so is a
    session that asked for CUDA's and fell back to the CPU's (onnxruntime-gpu without its CUDA libraries, here
    a CPU-only onnxruntime told that it has the provider)."""
    ort = pytest.importorskip("onnxruntime")
    has_cuda = "CUDAExecutionProvider" in ort.get_available_providers()
    onnx_file = api.export(checkpoint("padim"), tmp_path / "padim.onnx")
    cuda = ("cuda", " CUDA:0 ", torch.device("cuda", 1))
    assert onnx_providers(torch.device("cpu")) == onnx_providers("auto") == ["CPUExecutionProvider"]
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    assert load_runner(onnx_file, device="auto").provider == "CPUExecutionProvider"  # auto: the CPU's, quietly
    for name in cuda:
        with pytest.raises(CflowInputError, match="no CUDA execution provider: install onnxruntime-gpu") as err:
            load_runner(onnx_file, device=name)
        assert "\n" not in str(err.value)
    for bad in ("mps", "gpu", "cuda:x", "auto:1"):
        with pytest.raises(CflowInputError, match="onnxruntime scores on auto, cpu, cuda or cuda:N"):
            onnx_providers(bad)
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert onnx_providers(torch.device("cuda", 1)) == [("CUDAExecutionProvider", {"device_id": 1}),
                                                       "CPUExecutionProvider"]
    assert onnx_providers("auto")[0] == ("CUDAExecutionProvider", {"device_id": 0})
    assert onnx_providers(torch.device("cpu")) == ["CPUExecutionProvider"]
    if not has_cuda:
        for name in cuda:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # onnxruntime's note that it has no such provider
                with pytest.raises(CflowInputError, match="could not start its CUDA execution provider") as err:
                    load_runner(onnx_file, device=name)
            assert "\n" not in str(err.value)
    with pytest.raises(CflowInputError, match="would run on CPUExecutionProvider"):
        check_provider("cuda:0", "CPUExecutionProvider")
    check_provider("auto", "CPUExecutionProvider")
    check_provider("cuda", "CUDAExecutionProvider")
