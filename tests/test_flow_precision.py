"""The flows' matrix-product precision (`--flow-precision`, issue 34 item 8): bf16 products keep the likelihood
close to fp32's and everything summed from them in fp32, fp32 stays what it was bit for bit, and the flow precision is recorded and enforced as `--precision` is."""

from __future__ import annotations

import pytest
import torch
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from cflow_ad import DataSource, api
from cflow_ad.checkpoint import load_checkpoint, read_metadata
from cflow_ad.cli import main
from cflow_ad.device import Compute
from cflow_ad.errors import CflowInputError
from cflow_ad.flow_decoder import ConditionalFlow, FoldedFlow
from cflow_ad.inference import Inspector
from cflow_ad.positional_encoding import PositionalCondition

from .conftest import TINY
from .test_device import _one_line_error

# What may touch a bf16 tensor: the products, the casts into and out of them and views of their operands.
PRODUCTS_AND_CASTS = {"mm", "bmm", "_to_copy", "t", "view", "_unsafe_view", "select", "transpose", "expand"}


class _Bf16Ops(TorchDispatchMode):
    """Records the name of every aten op that is given a bfloat16 tensor."""

    def __init__(self):
        super().__init__()
        self.names: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if any(isinstance(t, torch.Tensor) and t.dtype == torch.bfloat16 for t in pytree.tree_leaves((args, kwargs))):
            self.names.add(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


def _flow(dim: int = 128, cond_dim: int = 32, side: int = 8):
    """An 8-block flow moved off its initial weights, the conditions of a side x side map and 4 images'
    standard normal fibers (what the whitening hands the flow)."""
    flow = ConditionalFlow(dim, cond_dim, n_blocks=8, seed=0)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in flow.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return flow, PositionalCondition(cond_dim, side, side), torch.randn(4, side * side, dim, generator=g)


def test_bf16_products_keep_the_likelihood_close_and_fp32():
    """Only the products see bf16: the soft clamp and exp of the scales, the log-det sums, the Gaussian
    log-likelihood and the gradients are fp32, in training (forward and backward) and in the folded form.
    Tolerance: bf16 keeps 8 significant bits (each factor rounded by up to 2^-9 relative), so the latent u
    moves by about 1e-3 relative and -|u|^2 / 2D, about -0.5, by a few 1e-3 per dimension (0.004 at most
    here); 0.01 allows for that, where the spread of the per-dimension log-likelihood over these fibers is 0.07
    (0.29-0.74 over magnetic_tile's locations, benchmarks/RESULTS.md)."""
    flow, cond, x = _flow()
    dim, places = x.shape[-1], x.shape[1]
    exact = flow.log_prob(x, cond) / dim
    exact_grads = torch.autograd.grad(exact.sum(), list(flow.parameters()))
    flow.matmul_precision = "bf16"
    fibers = x.clone().requires_grad_()
    with _Bf16Ops() as ops:
        u, log_det = flow(fibers, cond)
        low = flow.log_prob(fibers, cond) / dim
        low.sum().backward()
        with torch.no_grad():
            folded = FoldedFlow(flow, cond, places)(x) / dim
    assert "mm" in ops.names and ops.names <= PRODUCTS_AND_CASTS, ops.names - PRODUCTS_AND_CASTS
    assert {t.dtype for t in (u, log_det, low, folded, fibers.grad)} == {torch.float32}
    assert all(p.grad.dtype == torch.float32 for p in flow.parameters())
    assert not torch.equal(low, exact)  # it did run in bf16
    assert (low - exact).abs().max() < 0.01 and exact.std() > 0.05
    assert (folded - low).abs().max() < 1e-3  # the folded form computes the same function
    # Training follows the same slope: a weight's gradient sums many rounded terms that partly cancel, so it
    # moves more than the likelihood, 2% over all the weights here (up to 8% for one layer's small gradient).
    got, want = (torch.cat([g.flatten() for g in grads]) for grads in ([p.grad for p in flow.parameters()], exact_grads))
    assert (got - want).norm() < 0.05 * want.norm()


def test_fp32_flows_are_the_default_bit_for_bit(tiny_checkpoint, synthetic_root):
    """Explicit fp32 flows give the default's maps and scores bit for bit, also after a bf16 run of the same
    model (its folded flows are rebuilt when the precision changes); bf16 flows hand on fp32 maps."""
    model = load_checkpoint(tiny_checkpoint)
    x = torch.stack([api.D.load_image(p, TINY.image_size)
                     for p in sorted((synthetic_root / "synthetic" / "test" / "spot").iterdir())[:2]])
    with torch.no_grad():
        default = Compute("cpu").place(model)(x)
        Compute("cpu", flow_precision="bf16").place(model)
        logs, low = model.log_density_maps(model.features(x)), model(x)
        explicit = Compute("cpu", flow_precision="fp32").place(model)(x)
    assert all(t.dtype == torch.float32 for t in (*logs, *low))
    assert not torch.equal(low[0], default[0])
    assert all(torch.equal(a, b) for a, b in zip(default, explicit))


def test_an_unknown_flow_precision_is_refused():
    for name in ("fp16", "tf32"):  # tf32: PyTorch's switch is process-wide, so it is not offered (README)
        with pytest.raises(CflowInputError, match=f"unknown --flow-precision '{name}': use one of fp32, bf16"):
            Compute("cpu", flow_precision=name)


def test_the_flow_precision_is_recorded_and_enforced(tiny_checkpoint, synthetic_root, tmp_path, capsys):
    """As for `--precision`: the checkpoint records it (an older file reads fp32: test_model_files), another one
    is refused in one line until `calibrate --flow-precision` refits the model in it, and only fp32 flows export
    to ONNX."""
    data = ["--data", str(synthetic_root), "--category", "synthetic", "--device", "cpu"]
    source = DataSource(synthetic_root, "synthetic")
    fp32 = str(tiny_checkpoint)
    assert read_metadata(fp32)["flow_precision"] == "fp32"
    err = _one_line_error(capsys, ["--quiet", "test", "--model", fp32, *data, "--output", str(tmp_path / "t"),
                                   "--flow-precision", "bf16"])
    assert "fitted with fp32 flows: run it with --flow-precision fp32" in err and "calibrate --flow-precision bf16" in err
    bf16 = tmp_path / "bf16.safetensors"
    with pytest.raises(SystemExit) as done:
        main(["--quiet", "calibrate", "--model", fp32, *data, "--output", str(bf16), "--flow-precision", "bf16"])
    assert done.value.code == 0
    meta = read_metadata(bf16)
    assert (meta["precision"], meta["flow_precision"]) == ("fp32", "bf16") and meta["thresholds"]
    metrics = api.test(bf16, None, source, progress=False, device="cpu", flow_precision="bf16")
    assert metrics["device"] == "cpu, fp32, bf16 flows" and metrics["thresholds"]
    with pytest.raises(CflowInputError, match="fitted with bf16 flows: run it with --flow-precision bf16"):
        api.test(bf16, None, source, progress=False, device="cpu")
    with pytest.raises(CflowInputError, match="fitted with bf16 flows"):
        Inspector(bf16, "torch", compute=Compute("cpu"))  # what `serve --runtime torch` loads
    with pytest.raises(CflowInputError, match="--flow-precision bf16: onnxruntime runs fp32.*calibrate --flow-precision fp32"):
        api.export(bf16, tmp_path / "m.onnx")
    with pytest.raises(CflowInputError, match="--flow-precision bf16 applies to --runtime torch"):
        api.test(bf16, None, source, progress=False, device="cpu", runtime="onnx", flow_precision="bf16")
    assert not (tmp_path / "m.onnx").exists()


def test_training_with_bf16_flows(synthetic_root, padim_checkpoint, tmp_path):
    """The decoders train with bf16 products (forward and backward) and the checkpoint says so; a method without
    flows refuses a flow precision rather than ignore it."""
    source = DataSource(synthetic_root, "synthetic")
    path = api.train(TINY.replace(sub_epochs=1), tmp_path / "m", source, progress=False, log=lambda m: None,
                     device="cpu", flow_precision="bf16")
    meta = read_metadata(path)
    assert meta["flow_precision"] == "bf16" and meta["precision"] == "fp32"
    history = meta["extra"]["history"]
    assert history["epoch_loss"] and history["skipped_steps"] == 0  # no non-finite step
    metrics = api.test(path, None, source, progress=False, device="cpu", flow_precision="bf16")
    assert metrics["image_auroc"] > 0.9  # the synthetic defects, as the fp32 fit finds them
    for run in (lambda: api.train(TINY.replace(method="padim"), tmp_path / "p", source, progress=False,
                                  log=lambda m: None, device="cpu", flow_precision="bf16"),
                lambda: api.test(padim_checkpoint, None, source, progress=False, device="cpu", flow_precision="bf16")):
        with pytest.raises(CflowInputError, match="--flow-precision bf16 applies to CFLOW-AD's flows: a padim model"):
            run()
    assert not (tmp_path / "p" / "model.safetensors").exists()
