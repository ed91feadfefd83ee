"""Training: learning-rate schedule, losses, reproducibility and the end-to-end pipeline."""

from __future__ import annotations

import math

import pytest
import torch

from cflow_ad import api
from cflow_ad.checkpoint import load_checkpoint, read_metadata
from cflow_ad.config import CFlowConfig
from cflow_ad.model import CFlowModel
from cflow_ad.source import DataSource
from cflow_ad.training import fiber_loss, learning_rate, location_chunks, meta_epochs, steps_per_pass

from .conftest import TINY


def test_learning_rate_warms_up_then_anneals():
    cfg = CFlowConfig(lr=1e-3, warmup_epochs=1)
    assert learning_rate(cfg, 0.0, 10) == pytest.approx(1e-4)
    assert learning_rate(cfg, 1.0, 10) == pytest.approx(1e-3)
    assert learning_rate(cfg, 10.0, 10) == pytest.approx(1e-6)
    lrs = [learning_rate(cfg, e / 4, 10) for e in range(41)]
    assert all(b >= a for a, b in zip(lrs[:4], lrs[1:5])) and all(b <= a for a, b in zip(lrs[4:], lrs[5:]))


def test_losses():
    lp = torch.tensor([-1.0, 0.5])
    assert fiber_loss(lp, "nll").item() == pytest.approx(0.25)
    expect = -(math.log(1 / (1 + math.exp(1.0))) + math.log(1 / (1 + math.exp(-0.5)))) / 2
    assert fiber_loss(lp, "logsigmoid").item() == pytest.approx(expect, rel=1e-6)


def test_trained_model_finds_synthetic_defects(tiny_checkpoint, synthetic_root, tmp_path):
    metrics = api.test(tiny_checkpoint, tmp_path, source=DataSource(synthetic_root, "synthetic"), progress=False)
    assert metrics["image_auroc"] > 0.8
    assert metrics["pixel_auroc"] > 0.95
    assert metrics["aupro"] > 0.85
    assert set(metrics["per_type"]) == {"scratch", "spot"}
    history = read_metadata(tiny_checkpoint)["extra"]["history"]
    assert history["epoch_loss"][-1] < history["epoch_loss"][0]
    assert (tmp_path / "metrics.json").is_file() and (tmp_path / "scores.csv").read_text().count("\n") == 13


def test_same_seed_same_model_and_metrics(tiny_checkpoint, synthetic_root, tmp_path):
    again = api.train(TINY, tmp_path, DataSource(synthetic_root, "synthetic"), progress=False, log=lambda m: None)
    a = api.test(tiny_checkpoint, None, source=DataSource(synthetic_root, "synthetic"), progress=False)
    b = api.test(again, None, source=DataSource(synthetic_root, "synthetic"), progress=False)
    # Threaded CPU kernels may round differently run to run, which can flip the order of a few
    # near-tied pixel scores; that moves a metric by ~1e-9, while another seed moves it by ~1e-4 here.
    for key in ("image_auroc", "pixel_auroc", "aupro"):
        assert a[key] == pytest.approx(b[key], abs=1e-6)
    wa = load_checkpoint(tiny_checkpoint).decoders.state_dict()
    wb = load_checkpoint(again).decoders.state_dict()
    assert all(torch.allclose(wa[k], wb[k], atol=1e-5) for k in wa)


def test_validation_split_selects_a_meta_epoch(synthetic_root, tmp_path):
    cfg = TINY.replace(epochs=2, sub_epochs=1, val_fraction=0.25, coupling_layers=1)
    path = api.train(cfg, tmp_path, source=DataSource(synthetic_root, "synthetic"), progress=False, log=lambda m: None)
    history = read_metadata(path)["extra"]["history"]
    assert len(history["val_nll"]) == 2
    assert history["selected_meta_epoch"] == 1 + history["val_nll"].index(min(history["val_nll"]))
    assert history["train_images"] == 18


def test_steps_per_pass_count_the_chunks_training_takes():
    cfg = TINY.replace(batch_size=8, fiber_batch=200)  # 128 px: 16x16 and 8x8 maps
    n, gen = 21, torch.Generator().manual_seed(0)
    counted = [sum(len(location_chunks(torch.zeros(b, (128 // s) ** 2, 1), cfg.fiber_batch, gen)) for b in (8, 8, 5))
               for s in cfg.strides]
    assert steps_per_pass(cfg, n) == counted == [21, 8]  # 256 locations: a map a step; 64: three maps a step


def test_min_steps_trains_a_small_set_longer(synthetic_root, tmp_path):
    cfg = TINY.replace(epochs=1, sub_epochs=2, coupling_layers=1, min_steps=30)
    assert meta_epochs(cfg, 24) == 3 and meta_epochs(cfg.replace(min_steps=0), 24) == 1  # 6 steps a pass at 8x8
    assert meta_epochs(cfg, 1000) == 1  # a large set already takes the steps
    path = api.train(cfg, tmp_path, source=DataSource(synthetic_root, "synthetic"), progress=False, log=lambda m: None)
    history = read_metadata(path)["extra"]["history"]
    assert history["epochs"] == 6 and len(history["epoch_loss"]) == 6


def test_whitening_is_fitted_on_unrotated_images_with_or_without_the_feature_cache(synthetic_root, tmp_path):
    cfg = TINY.replace(epochs=1, sub_epochs=1, coupling_layers=1)
    models = []
    for rotation in (0.0, 5.0):  # 0: features cached once; 5: recomputed per batch, rotated
        path = api.train(cfg.replace(rotation=rotation), tmp_path / str(rotation),
                         DataSource(synthetic_root, "synthetic"), progress=False, log=lambda m: None)
        models.append(load_checkpoint(path))
    for a, b in zip(models[0].whitenings, models[1].whitenings):
        assert a.mean.abs().sum() > 0 and torch.isfinite(a.weight).all()
        assert torch.allclose(a.mean, b.mean) and torch.allclose(a.weight, b.weight) and torch.allclose(a.log_det, b.log_det)
    assert not torch.equal(models[0].decoders.state_dict()["0.blocks.0.out.weight"],
                           models[1].decoders.state_dict()["0.blocks.0.out.weight"])


def test_location_chunks_use_every_fiber_once_and_every_location_per_step():
    b, locations, d = 6, 5, 3
    fibers = torch.arange(b * locations * d, dtype=torch.float32).view(b, locations, d)
    chunks = location_chunks(fibers, 10, torch.Generator().manual_seed(0))
    assert [c.shape for c in chunks] == [(2, locations, d)] * 3  # 10 // 5 = 2 rows per step
    stacked = torch.cat(chunks)
    for loc in range(locations):  # each location keeps its own fibers, shuffled over the images
        got = sorted(stacked[:, loc, 0].tolist())
        assert got == sorted(fibers[:, loc, 0].tolist())
    assert not torch.equal(stacked, fibers)  # shuffled
    assert [c.shape[0] for c in location_chunks(fibers, 3, torch.Generator())] == [1] * 6  # maps above the batch: one row


def test_folded_decoders_follow_training_with_the_fused_optimiser(synthetic_root):
    from cflow_ad.training import fit

    ds = DataSource(synthetic_root, "synthetic").open("train", TINY.image_size)
    model = CFlowModel(TINY.replace(epochs=1, sub_epochs=2))
    feats = model.features(torch.stack([ds[i]["image"] for i in range(3)]))
    seen = []

    def on_epoch(epoch, m):
        with torch.no_grad():
            m.eval()
            folded = m.log_density_maps(feats)
            m.train()
            plain = m.log_density_maps(feats)
            m.eval()
        for a, b in zip(folded, plain):
            assert torch.allclose(a, b, atol=1e-4)
        seen.append(folded[0])

    fit(model, ds, progress=False, log=lambda m: None, on_epoch=on_epoch)
    assert len(seen) == 2 and not torch.allclose(seen[0], seen[1], atol=1e-4)  # epoch 2 moved the folds too


@pytest.mark.parametrize("mode", ["log", "stateless"])
@pytest.mark.parametrize("budget", [0, 1 << 30], ids=["two-passes", "kept"])
def test_fitted_constants_streamed_equal_the_whole_set(budget, mode):
    """The constants fitted from batches (kept, or made twice when over budget) equal those computed
    on all maps at once, in either fixed mode; a non-finite image is left out."""
    from dataclasses import replace

    from cflow_ad.scoring import fit_constants, score_set

    model = CFlowModel(replace(TINY, normalization=mode), pretrained=False)
    gen = torch.Generator().manual_seed(0)
    batches = [[torch.randn(5, 16, 16, generator=gen) - 2, torch.randn(5, 8, 8, generator=gen) - 3] for _ in range(4)]
    batches[1][0][2, 3, 3] = float("nan")
    fit_constants(model, lambda: iter(batches), chunk=3, budget_bytes=budget)
    whole = [torch.cat([b[k] for b in batches]) for k in range(2)]
    keep = torch.ones(20, dtype=torch.bool)
    keep[7] = False
    whole = [w[keep] for w in whole]
    refs = torch.stack([w.max() for w in whole])
    neg, _ = score_set(whole, model.image_size, "stateless", refs, 0.0)  # -S
    assert torch.allclose(model.ref_log_density, refs)
    assert model.map_offset.item() == pytest.approx(-neg.min().item(), rel=1e-6)
    maps, _ = score_set(whole, model.image_size, mode, refs, model.map_offset)
    assert maps.min().item() == pytest.approx(0.0, abs=1e-5)  # training maps start at 0
    assert model.train_max_score.item() == pytest.approx(maps.max().item(), rel=1e-5)


@pytest.mark.parametrize("workers", [0, 1])
def test_a_partial_image_cache_trains_the_same_model(synthetic_root, tmp_path, monkeypatch, workers):
    """Rotation keeps features uncached, so every pass reads the images: with 1 MiB, a third holds 7 of
    the 24, and batches of one make 7 batches wholly cached (once dropped, misaligning the rest).
    Workers sample batches ahead of the loop, while the cache still grows."""
    from cflow_ad import training

    passes = []
    batches = training._Images.batches

    def counted(self, order):
        order = list(order)
        passes.append((len(self), sum(all(i in self.cache for i in idx.tolist()) for idx in order)))
        yield from batches(self, order)

    monkeypatch.setattr(training._Images, "batches", counted)
    cfg = TINY.replace(batch_size=1, sub_epochs=1, coupling_layers=1, rotation=5.0)
    models = []
    for memory_mb in (1, cfg.memory_mb):
        path = api.train(cfg.replace(memory_mb=memory_mb), tmp_path / str(memory_mb), DataSource(synthetic_root, "synthetic"),
                         workers=workers, progress=False, log=lambda m: None)
        models.append(load_checkpoint(path).state_dict())
    # the encoder pass, the epoch and the scoring constants' pass: with 1 MiB the last two find 7 cached
    assert passes == [(24, 0), (24, 7), (24, 7), (24, 0), (24, 24), (24, 24)]
    assert models[0].keys() == models[1].keys()
    assert all(torch.allclose(models[0][k], models[1][k], atol=1e-6) for k in models[1])


def test_the_fused_adam_skips_a_step_on_the_device_flag():
    """What `_Run.step` relies on: with `found_inf` 1 the fused Adam leaves the weights, both moments and
    the step count bitwise as they were (NaN gradients included); with 0 it is a plain step, bit for bit."""
    def adam_after_two_steps():
        gen = torch.Generator().manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(5, 3, generator=gen)), torch.nn.Parameter(torch.randn(4, generator=gen))]
        opt = torch.optim.Adam(params, lr=1e-2, fused=True)
        for _ in range(3):  # two steps, then the gradients of the third
            if params[0].grad is not None:
                opt.step()
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen)
        return params, opt

    def snapshot(params, opt):
        return [t.clone() for p in params for t in (p.detach(), *opt.state[p].values())]

    params, opt = adam_after_two_steps()
    before = snapshot(params, opt)
    params[0].grad[0, 0] = float("nan")
    opt.found_inf = torch.ones(())
    opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, snapshot(params, opt)))

    plain, flagged = adam_after_two_steps(), adam_after_two_steps()
    plain[1].step()
    flagged[1].found_inf = torch.zeros(())
    flagged[1].step()
    after = snapshot(*plain), snapshot(*flagged)
    assert opt.state[params[0]]["step"] == 2 and plain[1].state[plain[0][0]]["step"] == 3
    assert all(torch.equal(a, b) for a, b in zip(*after))


def test_a_non_finite_step_is_skipped_counted_and_leaves_the_weights(synthetic_root, monkeypatch):
    """The first image batch's 10 steps (8 at 16x16, 2 at 8x8) all have a NaN loss: each is skipped and
    counted, the decoders and Adam's state stay bitwise as they were, and the 10th in a row halves the
    learning rate from the next image batch on, whose steps train again."""
    from cflow_ad import training

    real, calls = training.fiber_loss, {"n": 0}

    def flaky(lp, kind):
        calls["n"] += 1
        loss = real(lp, kind)
        return loss * float("nan") if calls["n"] <= 10 else loss

    batches = []
    image_batch = training._Run.image_batch

    def watched(run, feats):
        before = [t.clone() for t in run.model.decoders.state_dict().values()]
        lr = run.opt.param_groups[0]["lr"]
        image_batch(run, feats)
        batches.append({
            "same": all(torch.equal(a, b) for a, b in zip(before, run.model.decoders.state_dict().values())),
            "adam untouched": all(not s["step"] and not s["exp_avg"].any() and not s["exp_avg_sq"].any()
                                  for s in run.opt.state.values()),
            "lr": lr, "skipped": run.history["skipped_steps"], "scale": run.history["lr_scale"],
            "taken": run.state.loss_steps})

    monkeypatch.setattr(training, "fiber_loss", flaky)
    monkeypatch.setattr(training._Run, "image_batch", watched)
    cfg = TINY.replace(sub_epochs=1)
    history = training.fit(CFlowModel(cfg), DataSource(synthetic_root, "synthetic").open("train", cfg.image_size),
                           progress=False, log=lambda m: None)
    first, second = batches[:2]
    assert first == {"same": True, "adam untouched": True, "lr": learning_rate(cfg, 0.0, 1), "skipped": 10,
                     "scale": 0.5, "taken": 0}
    assert not second["same"] and not second["adam untouched"] and second["skipped"] == 10 and second["taken"] == 10
    assert second["lr"] == pytest.approx(learning_rate(cfg, 1 / 3, 1) * 0.5)
    assert history["skipped_steps"] == 10 and history["lr_scale"] == 0.5


def test_fitting_stops_its_image_loader_workers(synthetic_root):
    """Persistent workers would outlive `fit` (the loader and `_Images` refer to each other), also when
    training fails; so would PaDiM's `fit_baseline`'s."""
    import multiprocessing

    from cflow_ad.baselines import PaDiM
    from cflow_ad.device import Compute
    from cflow_ad.training import fit, fit_baseline

    cfg = TINY.replace(sub_epochs=1, coupling_layers=1, rotation=5.0)  # rotated: every epoch reads the images
    ds = DataSource(synthetic_root, "synthetic").open("train", cfg.image_size)
    compute = Compute("cpu", workers=1)
    fit(CFlowModel(cfg), ds, progress=False, log=lambda m: None, compute=compute)
    assert multiprocessing.active_children() == []

    def fail(epoch, model):
        assert multiprocessing.active_children(), "the loader's worker should still run here"
        raise RuntimeError("stop")

    with pytest.raises(RuntimeError, match="stop"):
        fit(CFlowModel(cfg), ds, progress=False, log=lambda m: None, compute=compute, on_epoch=fail)
    assert multiprocessing.active_children() == []
    fit_baseline(PaDiM(TINY.replace(method="padim")), ds, progress=False, compute=compute)
    assert multiprocessing.active_children() == []


def test_the_image_cache_is_not_page_locked(monkeypatch):
    """On a GPU the loader of `_Images` must not pin: the per-image cache keeps what it reads, and only
    the stacked batch is pinned for its copy."""
    from cflow_ad.device import Compute
    from cflow_ad.training import _Images

    monkeypatch.setattr(Compute, "pin_memory", property(lambda self: True))  # as on a GPU
    images = _Images([{"image": torch.zeros(3, 4, 4)}], 0, Compute("cpu", workers=0))
    images.todo = [[0]]
    images._decoded()
    assert images._loader.pin_memory is False
