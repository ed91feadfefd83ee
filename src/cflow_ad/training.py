"""Training loop (Eq. 7) and the calibration of the stateless scoring constants.

Without rotation augmentation the encoder runs once over the training images (which also
fits the location whitening) and training is decoder-only; with it, features are computed
per image batch. The fibers (feature vectors) of a batch's maps are shuffled over the
images per location and fed to the decoders about `fiber_batch` at a time
(`location_chunks`), one step of a single fused Adam over all decoders per chunk. Model
selection never looks at the test set: the final model is kept unless a validation split
of the training images is asked for, then the meta-epoch with the best validation
likelihood wins.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset
from torchvision.transforms.v2 import functional as TF
from tqdm import tqdm

from .baselines import DistanceModel
from .config import CFlowConfig
from .flow_decoder import LocationWhitening
from .model import CFlowModel
from .scoring import score_set


class _ImageOnly(Dataset):
    """Images of a dataset as uint8, decoded once and kept in memory up to a byte budget."""

    def __init__(self, dataset: Dataset, budget_bytes: int = 2 << 30):
        self.dataset, self.budget, self.cache = dataset, budget_bytes, {}

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> torch.Tensor:
        if i in self.cache:
            return self.cache[i]
        img = (self.dataset[i]["image"] * 255).round().to(torch.uint8)
        if (len(self.cache) + 1) * img.numel() <= self.budget:
            self.cache[i] = img
        return img


def _float_images(images: _ImageOnly, idx: torch.Tensor) -> torch.Tensor:
    """Images `idx` of an `_ImageOnly` set as a [0, 1] float batch."""
    return torch.stack([images[int(i)] for i in idx]).float() / 255


def learning_rate(config: CFlowConfig, epoch: float, total_epochs: int) -> float:
    """Linear warm-up from lr/10, then cosine annealing down to lr/1000 (per image batch)."""
    lr, eta_min, warm = config.lr, config.lr * 1e-3, min(config.warmup_epochs, total_epochs)
    if epoch < warm:
        return lr / 10 + (lr - lr / 10) * epoch / warm
    progress = (epoch - warm) / max(total_epochs - warm, 1e-8)
    return eta_min + (lr - eta_min) * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def fiber_loss(log_prob_per_dim: torch.Tensor, kind: str) -> torch.Tensor:
    """nll: Eq. 7 per dimension; logsigmoid: the authors' -logsigmoid(log p / D)."""
    if kind == "nll":
        return -log_prob_per_dim.mean()
    return -F.logsigmoid(log_prob_per_dim).mean()


def _rotate(batch: torch.Tensor, max_deg: float, gen: torch.Generator) -> torch.Tensor:
    if max_deg <= 0:
        return batch
    angles = (torch.rand(batch.shape[0], generator=gen) * 2 - 1) * max_deg
    return torch.stack(
        [TF.rotate(img, float(a), interpolation=TF.InterpolationMode.BILINEAR) for img, a in zip(batch, angles)]
    )


def _batches(n: int, batch_size: int, gen: torch.Generator | None = None) -> list[torch.Tensor]:
    """Index batches over n images: shuffled with `gen`, in order without."""
    order = torch.randperm(n, generator=gen) if gen is not None else torch.arange(n)
    return list(order.split(batch_size))


def location_chunks(fibers: torch.Tensor, fiber_batch: int, gen: torch.Generator) -> tuple[torch.Tensor, ...]:
    """Random fiber batches of [B, L, D] fibers, each holding every location equally often.

    Each location's B fibers are shuffled over the images independently, then cut into rows of
    whole maps, max(1, fiber_batch // L) rows per optimizer step. Every step then sees every
    location, so the condition terms broadcast over the rows instead of being gathered per fiber
    (which made the gather and its backward a large share of a step), and the location mix of a
    step never depends on chance. A map larger than fiber_batch gives steps of one row.
    """
    b, locations, d = fibers.shape
    order = torch.rand(b, locations, generator=gen).argsort(0)
    shuffled = fibers.gather(0, order[..., None].expand(-1, -1, d))
    return shuffled.split(max(1, fiber_batch // locations))


class _Features:
    """Encoder features of the training images, per index batch.

    Without rotation the features never change, so one encoder pass fills a cache (up to a
    byte budget) and training is decoder-only afterwards. The same pass accumulates the
    per-location moments that fit the location whitening.
    """

    def __init__(self, model: CFlowModel, images: Dataset, config: CFlowConfig, fit_whitening: bool,
                 progress: bool = False, budget_bytes: int = 4 << 30):
        self.model, self.images, self.config = model, images, config
        self.cache: list[torch.Tensor] | None = None
        keep = config.rotation <= 0
        fit_whitening = fit_whitening and model.whitenings is not None
        if not keep and not fit_whitening:
            return
        moments = None
        parts: list[list[torch.Tensor]] = [[] for _ in model.decoders]
        size = 0
        for idx in tqdm(_batches(len(images), config.batch_size), desc="features", disable=not progress, leave=False):
            feats = model.features(self._images(idx))
            if fit_whitening:
                m = [LocationWhitening.moments(f.flatten(2).transpose(1, 2)) for f in feats]
                moments = m if moments is None else [(a + c, b + d) for (a, b), (c, d) in zip(moments, m)]
            if keep:
                size += sum(f.numel() * f.element_size() for f in feats)
                keep = size <= budget_bytes
                if keep:
                    for part, f in zip(parts, feats):
                        part.append(f)
                else:
                    parts = []
        if fit_whitening:
            for w, (total, outer) in zip(model.whitenings, moments):
                w.fit_moments(total, outer, len(images), config.whitening_eps)
        if keep:
            self.cache = [torch.cat(p) for p in parts]

    def _images(self, idx: torch.Tensor) -> torch.Tensor:
        return _float_images(self.images, idx)

    def __call__(self, idx: torch.Tensor, gen: torch.Generator | None = None) -> list[torch.Tensor]:
        """Features of images `idx`; with `gen` (training) the images are randomly rotated first."""
        if self.cache is not None:
            return [c[idx] for c in self.cache]
        x = self._images(idx)
        if gen is not None:
            x = _rotate(x, self.config.rotation, gen)
        return self.model.features(x)


@torch.no_grad()
def log_density_maps_of(model: CFlowModel, features: Callable[[torch.Tensor], list[torch.Tensor]], n: int,
                        batch_size: int) -> list[torch.Tensor]:
    """Per-scale log-density maps [N, h_k, w_k] of n images, `features(idx)` giving their features."""
    model.eval()
    parts: list[list[torch.Tensor]] = [[] for _ in model.decoders]
    for idx in _batches(n, batch_size):
        for k, lm in enumerate(model.log_density_maps(features(idx))):
            parts[k].append(lm)
    return [torch.cat(p) for p in parts]


@torch.no_grad()
def calibrate(model: CFlowModel, logs: list[torch.Tensor]) -> None:
    """Fix the stateless constants from the training images' log maps: per-scale max log-density, map offset."""
    model.ref_log_density.copy_(torch.stack([lm.max() for lm in logs]))
    neg_sum, _ = score_set(logs, model.image_size, "stateless", model.ref_log_density, 0.0)  # -sum_k P_k
    offset = -neg_sum.amin()  # the largest summed probability seen in training: train maps are >= 0
    model.map_offset.copy_(offset)
    model.train_max_score.copy_((neg_sum + offset).flatten(1).amax(1).max().clamp_min(1e-6))


def fit(
    model: CFlowModel,
    train_set: Dataset,
    val_set: Dataset | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
    on_epoch: Callable[[int, CFlowModel], None] | None = None,
) -> dict:
    """Train the decoders of `model` in place; returns a history with losses and timings.

    `on_epoch(epoch, model)` runs after every epoch, outside the timed loop (benchmarks use it
    to trace accuracy over training; training itself never looks at its results).
    """
    cfg = model.config
    if len(train_set) == 0:
        raise ValueError("empty training set")
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    images = _ImageOnly(train_set)
    features = _Features(model, images, cfg, fit_whitening=True, progress=progress)
    val = _Features(model, _ImageOnly(val_set), cfg.replace(rotation=0.0), False) if val_set else None
    params = [p for p in model.decoders.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=cfg.lr, fused=True)  # one kernel per step: a third of a step unfused
    total_epochs = cfg.epochs * cfg.sub_epochs
    n_batches = math.ceil(len(images) / cfg.batch_size)
    history: dict = {"epoch_loss": [], "epoch_seconds": [], "val_nll": []}
    best = (math.inf, None)
    for meta in range(cfg.epochs):
        for sub in range(cfg.sub_epochs):
            epoch = meta * cfg.sub_epochs + sub
            model.train()  # the encoder stays in eval mode; leaving eval later refolds the decoders
            t0, loss_sum, loss_n, seen = time.perf_counter(), 0.0, 0, 0
            bar = tqdm(
                _batches(len(images), cfg.batch_size, gen),
                total=n_batches,
                desc=f"epoch {epoch + 1}/{total_epochs}",
                disable=not progress,
                leave=False,
            )
            for b, idx in enumerate(bar):
                for group in opt.param_groups:
                    group["lr"] = learning_rate(cfg, epoch + b / n_batches, total_epochs)
                for k, (decoder, f) in enumerate(zip(model.decoders, features(idx, gen))):
                    _, d, h, w = f.shape
                    fibers, log_det = model.fibers(k, f)
                    cond = model.condition(h, w)
                    for chunk in location_chunks(fibers, cfg.fiber_batch, gen):
                        lp = decoder.log_prob(chunk, cond)  # [rows, h*w]: the condition broadcasts
                        if log_det is not None:  # constant in theta: reported NLL stays exact
                            lp = lp + log_det
                        loss = fiber_loss(lp / d, cfg.loss)
                        opt.zero_grad(set_to_none=True)
                        loss.backward()
                        opt.step()
                        loss_sum += loss.item()
                        loss_n += 1
                seen += len(idx)
                bar.set_postfix(loss=f"{loss_sum / max(loss_n, 1):.3f}", img_s=f"{seen / (time.perf_counter() - t0):.1f}")
            seconds = time.perf_counter() - t0
            history["epoch_loss"].append(loss_sum / max(loss_n, 1))
            history["epoch_seconds"].append(seconds)
            log(f"epoch {epoch + 1}/{total_epochs}: loss {history['epoch_loss'][-1]:.4f}, {seconds:.1f} s")
            if on_epoch is not None:
                on_epoch(epoch + 1, model)
        if val is not None:
            val_logs = log_density_maps_of(model, val, len(val_set), cfg.batch_size)
            val_nll = -sum(lm.mean().item() for lm in val_logs) / len(val_logs)
            history["val_nll"].append(val_nll)
            log(f"meta-epoch {meta + 1}/{cfg.epochs}: validation NLL per dim {val_nll:.4f}")
            if val_nll < best[0]:
                best = (val_nll, copy.deepcopy(model.decoders.state_dict()))
    if best[1] is not None:
        model.decoders.load_state_dict(best[1])
        history["selected_meta_epoch"] = history["val_nll"].index(best[0]) + 1
    calibrate(model, log_density_maps_of(model, features, len(images), cfg.batch_size))
    model.eval()
    history["epochs"] = total_epochs
    return history


@torch.no_grad()
def fit_baseline(model: DistanceModel, train_set: Dataset, progress: bool = True, sample: int = 64) -> dict:
    """Fit PaDiM or SPADE in one encoder pass over the training images, then set the heat-map scale
    (`train_max_score`) from up to `sample` of them (each left out of its own SPADE search)."""
    cfg = model.config
    if len(train_set) < 2:
        raise ValueError("a baseline needs at least 2 training images")
    images = _ImageOnly(train_set, budget_bytes=0)  # one pass: nothing to keep
    batches = _batches(len(images), cfg.batch_size)
    t0 = time.perf_counter()
    bar = tqdm(batches, desc=f"fit {cfg.method}", disable=not progress, leave=False)
    model.fit(model.features(_float_images(images, idx)) for idx in bar)
    seconds = time.perf_counter() - t0
    picks = torch.linspace(0, len(images) - 1, min(sample, len(images))).round().long().unique()
    top = max(float(model.maps_from_features(model.features(_float_images(images, idx)), idx)[1].max())
              for idx in picks.split(cfg.batch_size))
    model.train_max_score.fill_(max(top, 1e-6))
    return {"fit_seconds": seconds, "epochs": 0}
