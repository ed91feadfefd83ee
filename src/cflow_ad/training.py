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
import json
import math
import os
import signal
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, Subset
from torchvision.transforms.v2 import functional as TF
from tqdm import tqdm

from .baselines import DistanceModel
from .config import CFlowConfig
from .distributed import all_reduce, any_rank, decoder_steps, rank_world, shard
from .errors import CflowInputError
from .flow_decoder import LocationWhitening
from .model import CFlowModel
from .scoring import probability_sum


NONFINITE_PATIENCE = 10  # skipped steps in a row before the learning rate is halved


class _ImageOnly(Dataset):
    """Images of a dataset as uint8, decoded once and kept in memory up to a byte budget. An image
    with non-finite values is remembered in `nonfinite` (uint8 cannot hold NaN, and a silent cast
    would train on garbage), and comes back as NaN from `_float_images`."""

    def __init__(self, dataset: Dataset, budget_bytes: int):
        self.dataset, self.budget, self.cache, self.nonfinite = dataset, budget_bytes, {}, set()

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> torch.Tensor:
        if i in self.cache:
            return self.cache[i]
        img = self.dataset[i]["image"]
        if not torch.isfinite(img).all():
            self.nonfinite.add(i)
            img = torch.zeros_like(img)
        img = (img * 255).round().to(torch.uint8)
        if (len(self.cache) + 1) * img.numel() <= self.budget:
            self.cache[i] = img
        return img


def _float_images(images: _ImageOnly, idx: torch.Tensor) -> torch.Tensor:
    """Images `idx` of an `_ImageOnly` set as a [0, 1] float batch (NaN for non-finite ones)."""
    batch = torch.stack([images[int(i)] for i in idx]).float() / 255
    for row, i in enumerate(idx.tolist()):
        if i in images.nonfinite:
            batch[row] = float("nan")
    return batch


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
                 progress: bool = False, budget_bytes: int = 0, log: Callable[[str], None] = print,
                 real: torch.Tensor | None = None):
        self.model, self.images, self.config = model, images, config
        self.cache: list[torch.Tensor] | None = None
        self.dropped = 0  # images with non-finite features, left out of the whitening fit
        real = torch.ones(len(images), dtype=torch.bool) if real is None else real  # False: a rank's padding
        keep = config.rotation <= 0 and budget_bytes > 0
        fit_whitening = fit_whitening and model.whitenings is not None
        if not keep and not fit_whitening:
            return
        moments = None
        for idx in tqdm(_batches(len(images), config.batch_size), desc="features", disable=not progress, leave=False):
            feats = model.features(self._images(idx))
            if fit_whitening:
                finite = _finite_rows(feats)
                self.dropped += int((~finite & real[idx]).sum())
                m = [LocationWhitening.moments(f[finite & real[idx]].flatten(2).transpose(1, 2)) for f in feats]
                moments = m if moments is None else [(a + c, b + d) for (a, b), (c, d) in zip(moments, m)]
            if keep and self.cache is None:  # filled in place: concatenating batches would need twice the budget
                per_image = sum(f[0].numel() * f.element_size() for f in feats)
                keep = per_image * len(images) <= budget_bytes
                self.cache = [f.new_empty((len(images), *f.shape[1:])) for f in feats] if keep else None
            if keep:
                for c, f in zip(self.cache, feats):
                    c[idx] = f
        if fit_whitening:
            n_real = int(all_reduce(torch.tensor(int(real.sum())), "sum"))
            self.dropped = int(all_reduce(torch.tensor(self.dropped), "sum"))
            moments = [(all_reduce(a, "sum"), all_reduce(b, "sum")) for a, b in moments]
            if self.dropped:
                log(f"warning: {self.dropped} training image(s) with non-finite features left out of the whitening fit")
            if self.dropped == n_real:
                raise CflowInputError("every training image gave non-finite features: check the training images")
            for w, (total, outer) in zip(model.whitenings, moments):
                w.fit_moments(total, outer, n_real - self.dropped, config.whitening_eps)
        if keep and isinstance(images, _ImageOnly):
            images.cache.clear()  # never read again: the features stand in for them

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
def calibrate(model: CFlowModel, log_batches: Callable[[], Iterable[list[torch.Tensor]]], chunk: int = 64,
              budget_bytes: int = 256 << 20) -> None:
    """Fix the stateless constants from the training images' log maps: per-scale max log-density, then
    the largest summed probability (the map offset) and the largest training map value (the heat-map
    scale). `log_batches()` yields each image batch's per-scale log maps. Memory stays bounded however
    many images there are: the batches are kept between the two passes while they fit in
    `budget_bytes`, else made again (one more decoder pass). Images with a non-finite map are left out."""

    def finite_batches(batches):
        for logs in batches:
            ok = torch.stack([torch.isfinite(lm).flatten(1).all(1) for lm in logs]).all(0)
            if ok.any():
                yield [lm[ok] for lm in logs]

    refs = torch.full((len(model.decoders),), -math.inf)
    kept: list[list[torch.Tensor]] | None = []
    size = 0
    for logs in finite_batches(log_batches()):
        refs = torch.maximum(refs, torch.stack([lm.max() for lm in logs]))
        size += sum(lm.numel() * lm.element_size() for lm in logs)
        kept = kept if kept is not None and size <= budget_bytes else None
        if kept is not None:
            kept.append(logs)
    refs = all_reduce(refs, "max")
    if not torch.isfinite(refs).all():
        raise CflowInputError("the trained model gives no finite likelihood on any training image: it cannot be used")
    model.ref_log_density.copy_(refs)
    high, low = -math.inf, math.inf
    for logs in kept if kept is not None else finite_batches(log_batches()):
        for i in range(0, logs[0].shape[0], chunk):  # full-size maps only a chunk at a time
            p = probability_sum([lm[i : i + chunk] for lm in logs], refs, model.image_size)
            high, low = max(high, p.max().item()), min(low, p.min().item())
    high = all_reduce(torch.tensor(high), "max").item()
    low = all_reduce(torch.tensor(low), "min").item()
    model.map_offset.fill_(high)  # the largest summed probability seen in training: train maps are >= 0
    model.train_max_score.fill_(max(high - low, 1e-6))  # the largest training map value


class TrainingInterrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM stopped training after its state was saved; `--resume` continues."""

    def __init__(self, state_path: Path):
        super().__init__(f"training interrupted; its state is saved in {state_path}: rerun with --resume to continue")
        self.state_path = state_path


class _StopRequests:
    """Turns SIGINT / SIGTERM into a flag the loop checks after each image batch, so the state
    saved is that of a whole step. A second SIGINT interrupts at once."""

    def __enter__(self) -> "_StopRequests":
        self.requested, self.previous = False, {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def _save_state(path: Path, state: dict) -> None:
    """Atomically (temp file + rename): a kill mid-write leaves the previous state intact."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_state(path: Path, config: CFlowConfig) -> dict:
    """The training state saved in `path`, if it was saved with the same options as `config`; the
    memory budget may differ (a run stopped for lack of memory can resume with a smaller one)."""
    state = torch.load(path, weights_only=True)  # tensors and plain containers only: nothing executes
    saved = CFlowConfig.from_dict(json.loads(state.get("config", "{}"))).replace(memory_mb=config.memory_mb)
    if saved != config:
        raise CflowInputError(f"the training state in '{path}' was saved with other options: "
                              "rerun with the same options, or without --resume to start over")
    return state


def _finite_rows(features: list[torch.Tensor]) -> torch.Tensor:
    """[B] True for the images whose features are finite at every scale."""
    return torch.stack([torch.isfinite(f).flatten(1).all(1) for f in features]).all(0)


def fit(
    model: CFlowModel,
    train_set: Dataset,
    val_set: Dataset | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
    on_epoch: Callable[[int, CFlowModel], None] | None = None,
    state_path: str | Path | None = None,
    resume: bool = False,
) -> dict:
    """Train the decoders of `model` in place; returns a history with losses and timings.

    With `state_path`, the whole training state (model, optimiser, RNG states, epoch and position,
    history) is written there atomically after every epoch and when SIGINT or SIGTERM arrives, and
    `resume=True` continues from it exactly: the same seed gives the same model as a run that was
    never stopped. The learning rate is a function of the position, so it needs no state of its own.

    Non-finite values never reach the weights: images with non-finite features are dropped from
    their batch (and from the whitening fit), and a step whose loss or gradient is not finite is
    skipped; after `NONFINITE_PATIENCE` skipped steps in a row the learning rate is halved. Both are
    counted in the history and logged.

    `on_epoch(epoch, model)` runs after every epoch, outside the timed loop (benchmarks use it
    to trace accuracy over training; training itself never looks at its results).
    """
    cfg = model.config
    if len(train_set) == 0:
        raise ValueError("empty training set")
    state_path = Path(state_path) if state_path is not None else None
    state = load_state(state_path, cfg) if resume and state_path is not None and state_path.is_file() else None
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    rank, world = rank_world()
    mine, real = shard(len(train_set))  # all images in one process
    budget = cfg.memory_mb * 2**20
    images = _ImageOnly(train_set if world == 1 else Subset(train_set, mine), budget // 3)
    features = _Features(model, images, cfg, fit_whitening=True, progress=progress, budget_bytes=budget * 2 // 3,
                         log=log, real=torch.tensor(real))
    batch_size, fiber_batch = max(1, cfg.batch_size // world), max(1, cfg.fiber_batch // world)  # the same global batch
    # validation runs once a meta-epoch: its images are decoded and encoded again rather than cached
    val = None if not val_set else _Features(model, _ImageOnly(val_set, 0), cfg.replace(rotation=0.0), False)
    params = [p for p in model.decoders.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=cfg.lr, fused=True)  # one kernel per step: a third of a step unfused
    total_epochs = cfg.epochs * cfg.sub_epochs
    n_batches = math.ceil(len(images) / batch_size)
    steps = decoder_steps(model.decoders)  # DDP-wrapped when distributed: gradients averaged over ranks
    history: dict = {"epoch_loss": [], "epoch_seconds": [], "val_nll": [], "skipped_steps": 0, "dropped_images": 0,
                     "lr_scale": 1.0}
    best: tuple[float, dict | None] = (math.inf, None)
    position = (0, 0, None, (0.0, 0, 0))  # epoch, next batch, the epoch's batch order, (loss sum, steps, images)
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        gen.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        history, best = state["history"], (state["best_nll"], state["best"])
        position = (state["epoch"], state["batch"], state["order"], tuple(state["partial"]))
        log(f"resuming at epoch {state['epoch'] + 1}/{total_epochs}, image batch {state['batch'] + 1}/{n_batches}")
    history["dropped_images"] = max(history["dropped_images"], features.dropped)

    def save(epoch: int, batch: int, order, partial) -> None:
        if state_path is not None and rank == 0:
            _save_state(state_path, {
                "config": cfg.to_json(), "model": model.state_dict(), "optimizer": opt.state_dict(),
                "generator": gen.get_state(), "torch_rng": torch.get_rng_state(), "history": history,
                "best_nll": best[0], "best": best[1], "epoch": epoch, "batch": batch, "order": order,
                "partial": list(partial)})

    skipped_in_row = 0
    with _StopRequests() as stop:
        for epoch in range(position[0], total_epochs):
            model.train()  # the encoder stays in eval mode; leaving eval later refolds the decoders
            resumed = epoch == position[0] and position[2] is not None
            order = position[2] if resumed else _batches(len(images), batch_size, gen)
            first = position[1] if resumed else 0
            loss_sum, loss_n, seen = position[3] if resumed else (0.0, 0, 0)
            t0 = time.perf_counter()
            bar = tqdm(range(first, len(order)), total=n_batches, initial=first, desc=f"epoch {epoch + 1}/{total_epochs}",
                       disable=not progress, leave=False)
            for b in bar:
                idx = order[b]
                lr = learning_rate(cfg, epoch + b / n_batches, total_epochs) * history["lr_scale"]
                for group in opt.param_groups:
                    group["lr"] = lr
                feats = features(idx, gen)
                finite = _finite_rows(feats)
                if world > 1 and any_rank(not finite.all()):  # ranks must take the same steps: all skip it
                    finite = torch.zeros_like(finite)
                if not finite.all():
                    history["dropped_images"] += int((~finite).sum())
                    log(f"warning: {int((~finite).sum())} image(s) with non-finite features left out of this batch"
                        f" ({history['dropped_images']} so far)")
                    feats = [f[finite] for f in feats]
                for k, f in enumerate(feats):
                    if f.shape[0] == 0:
                        continue
                    _, d, h, w = f.shape
                    fibers, log_det = model.fibers(k, f)
                    cond = model.condition(h, w)
                    for chunk in location_chunks(fibers, fiber_batch, gen):
                        lp = steps[k](chunk, cond)  # [rows, h*w]: the condition broadcasts
                        if log_det is not None:  # constant in theta: reported NLL stays exact
                            lp = lp + log_det
                        loss = fiber_loss(lp / d, cfg.loss)
                        opt.zero_grad(set_to_none=True)
                        value = loss.item()
                        if world > 1 and any_rank(not math.isfinite(value)):
                            value = math.nan  # a step is taken by all ranks or by none
                        if math.isfinite(value):
                            loss.backward()
                            grad = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
                        if not math.isfinite(value) or not torch.isfinite(grad):
                            skipped_in_row += 1
                            history["skipped_steps"] += 1
                            if skipped_in_row == NONFINITE_PATIENCE:
                                history["lr_scale"] /= 2
                                skipped_in_row = 0
                                log(f"warning: {NONFINITE_PATIENCE} non-finite steps in a row: learning rate"
                                    f" halved (x{history['lr_scale']:g})")
                            continue
                        skipped_in_row = 0
                        opt.step()
                        loss_sum += value
                        loss_n += 1
                seen += len(idx)
                bar.set_postfix(loss=f"{loss_sum / max(loss_n, 1):.3f}", img_s=f"{seen / (time.perf_counter() - t0):.1f}")
                if any_rank(stop.requested):
                    save(epoch, b + 1, order, (loss_sum, loss_n, seen))
                    raise TrainingInterrupted(state_path)
            seconds = time.perf_counter() - t0
            loss_sum, loss_n = (float(v) for v in all_reduce(torch.tensor([loss_sum, float(loss_n)], dtype=torch.float64)))
            if loss_n == 0:
                raise CflowInputError("every training step of an epoch had a non-finite loss or gradient: check the"
                                      " training images, or lower --lr")
            history["epoch_loss"].append(loss_sum / loss_n)
            history["epoch_seconds"].append(seconds)
            log(f"epoch {epoch + 1}/{total_epochs}: loss {history['epoch_loss'][-1]:.4f}, {seconds:.1f} s"
                + (f", {history['skipped_steps']} non-finite steps skipped" if history["skipped_steps"] else ""))
            if on_epoch is not None:
                on_epoch(epoch + 1, model)
            if val is not None and (epoch + 1) % cfg.sub_epochs == 0:
                val_logs = log_density_maps_of(model, val, len(val_set), cfg.batch_size)
                val_nll = -sum(lm.mean().item() for lm in val_logs) / len(val_logs)
                history["val_nll"].append(val_nll)
                log(f"meta-epoch {(epoch + 1) // cfg.sub_epochs}/{cfg.epochs}: validation NLL per dim {val_nll:.4f}")
                if val_nll < best[0]:
                    best = (val_nll, copy.deepcopy(model.decoders.state_dict()))
            save(epoch + 1, 0, None, (0.0, 0, 0))
            if any_rank(stop.requested):
                raise TrainingInterrupted(state_path)
    if best[1] is not None:
        model.decoders.load_state_dict(best[1])
        history["selected_meta_epoch"] = history["val_nll"].index(best[0]) + 1
    model.eval()
    calibrate(model, lambda: (model.log_density_maps(features(idx)) for idx in _batches(len(images), batch_size)))
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
