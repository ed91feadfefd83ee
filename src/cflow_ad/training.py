"""Training loop (Eq. 7) and the calibration of the stateless scoring constants.

Encoder features are computed once per image batch; the fibers (feature vectors) of
all its maps are shuffled and fed to the decoders in chunks of `fiber_batch`, one Adam
step per chunk, with a single optimiser over all decoders. Model selection never looks
at the test set: the final model is kept unless a validation split of the training
images is asked for, then the meta-epoch with the best validation likelihood wins.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms.v2 import functional as TF
from tqdm import tqdm

from .config import CFlowConfig
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


def _loader(images: Dataset, batch_size: int, shuffle: bool, gen: torch.Generator | None = None) -> DataLoader:
    return DataLoader(images, batch_size=batch_size, shuffle=shuffle, generator=gen, num_workers=0)


@torch.no_grad()
def log_density_maps_of(model: CFlowModel, loader: DataLoader) -> list[torch.Tensor]:
    """Per-scale log-density maps [N, h_k, w_k] of all images a loader yields (uint8 batches)."""
    model.eval()
    parts: list[list[torch.Tensor]] = [[] for _ in model.decoders]
    for batch in loader:
        for k, lm in enumerate(model.log_density_maps(model.features(batch.float() / 255))):
            parts[k].append(lm)
    return [torch.cat(p) for p in parts]


@torch.no_grad()
def calibrate(model: CFlowModel, loader: DataLoader) -> None:
    """Fix the stateless constants from training images: per-scale max log-density, map offset."""
    logs = log_density_maps_of(model, loader)
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
) -> dict:
    """Train the decoders of `model` in place; returns a history with losses and timings."""
    cfg = model.config
    if len(train_set) == 0:
        raise ValueError("empty training set")
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    images = _ImageOnly(train_set)
    params = [p for p in model.decoders.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=cfg.lr)
    total_epochs = cfg.epochs * cfg.sub_epochs
    n_batches = math.ceil(len(images) / cfg.batch_size)
    history: dict = {"epoch_loss": [], "epoch_seconds": [], "val_nll": []}
    best = (math.inf, None)
    for meta in range(cfg.epochs):
        for sub in range(cfg.sub_epochs):
            epoch = meta * cfg.sub_epochs + sub
            model.decoders.train()
            t0, loss_sum, loss_n, seen = time.perf_counter(), 0.0, 0, 0
            bar = tqdm(
                _loader(images, cfg.batch_size, True, gen),
                total=n_batches,
                desc=f"epoch {epoch + 1}/{total_epochs}",
                disable=not progress,
                leave=False,
            )
            for b, batch in enumerate(bar):
                x = _rotate(batch.float() / 255, cfg.rotation, gen)
                for group in opt.param_groups:
                    group["lr"] = learning_rate(cfg, epoch + b / n_batches, total_epochs)
                feats = model.features(x)
                for decoder, f in zip(model.decoders, feats):
                    _, d, h, w = f.shape
                    fibers = f.flatten(2).transpose(1, 2).reshape(-1, d)
                    cond = model.condition(h, w)
                    order = torch.randperm(fibers.shape[0], generator=gen)
                    for chunk in order.split(cfg.fiber_batch):
                        loc = chunk % (h * w)
                        if cond is None:
                            lp = decoder.log_prob(fibers[chunk])
                        elif chunk.numel() > h * w:  # cheaper to project each location once
                            lp = decoder.log_prob(fibers[chunk], cond, c_index=loc)
                        else:
                            lp = decoder.log_prob(fibers[chunk], cond[loc])
                        loss = fiber_loss(lp / d, cfg.loss)
                        opt.zero_grad(set_to_none=True)
                        loss.backward()
                        opt.step()
                        loss_sum += loss.item()
                        loss_n += 1
                seen += x.shape[0]
                bar.set_postfix(loss=f"{loss_sum / max(loss_n, 1):.3f}", img_s=f"{seen / (time.perf_counter() - t0):.1f}")
            seconds = time.perf_counter() - t0
            history["epoch_loss"].append(loss_sum / max(loss_n, 1))
            history["epoch_seconds"].append(seconds)
            log(f"epoch {epoch + 1}/{total_epochs}: loss {history['epoch_loss'][-1]:.4f}, {seconds:.1f} s")
        if val_set is not None and len(val_set):
            val_logs = log_density_maps_of(model, _loader(_ImageOnly(val_set), cfg.batch_size, False))
            val_nll = -sum(lm.mean().item() for lm in val_logs) / len(val_logs)
            history["val_nll"].append(val_nll)
            log(f"meta-epoch {meta + 1}/{cfg.epochs}: validation NLL per dim {val_nll:.4f}")
            if val_nll < best[0]:
                best = (val_nll, copy.deepcopy(model.decoders.state_dict()))
    if best[1] is not None:
        model.decoders.load_state_dict(best[1])
        history["selected_meta_epoch"] = history["val_nll"].index(best[0]) + 1
    calibrate(model, _loader(images, cfg.batch_size, False))
    model.eval()
    history["epochs"] = total_epochs
    return history
