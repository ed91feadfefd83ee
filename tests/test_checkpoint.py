"""One-file checkpoints: exact round trip, no pickle, clear errors."""

from __future__ import annotations

import json

import pytest
import torch

from cflow_ad.checkpoint import load_checkpoint, read_metadata, save_checkpoint
from cflow_ad.errors import CflowInputError


def test_round_trip_gives_identical_outputs(tiny_checkpoint, tmp_path):
    model = load_checkpoint(tiny_checkpoint)
    again = load_checkpoint(save_checkpoint(model, tmp_path / "copy.safetensors"))
    x = torch.rand(2, 3, 128, 128)
    with torch.no_grad():
        assert torch.equal(model(x)[0], again(x)[0])
    assert again.config == model.config
    assert float(model.map_offset) > 0 and float(model.train_max_score) > 0  # calibrated, not defaults


def test_metadata_holds_config_and_history(tiny_checkpoint):
    meta = read_metadata(tiny_checkpoint)
    assert meta["config"]["image_size"] == [128, 128] and meta["config"]["border_pad"] == 16
    assert len(meta["extra"]["history"]["epoch_loss"]) == 2


def test_checkpoint_is_not_a_pickle(tiny_checkpoint):
    data = tiny_checkpoint.read_bytes()
    assert not data.startswith(b"PK")  # not torch's zip of pickles
    # safetensors: a little-endian header length, a JSON header, then raw tensor bytes up to the end
    header_len = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + header_len])
    assert header["__metadata__"]["format"] == "cflow-ad/1"
    ends = [entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"]
    assert 8 + header_len + max(ends) == len(data)


@pytest.mark.parametrize("content", [b"", b"garbage bytes that are not safetensors"])
def test_bad_checkpoint_is_a_clear_error(tmp_path, content):
    path = tmp_path / "model.safetensors"
    path.write_bytes(content)
    with pytest.raises(CflowInputError, match="model.safetensors"):
        load_checkpoint(path)
    with pytest.raises(CflowInputError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.safetensors")
