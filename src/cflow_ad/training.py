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

import contextlib
import copy
import json
import math
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, Subset
from torchvision.transforms.v2 import functional as TF
from tqdm import tqdm

from . import data as D
from .baselines import DistanceModel
from .config import CFlowConfig
from .device import Compute
from .distributed import all_reduce, any_rank, decoder_steps, rank_world, shard
from .errors import CflowInputError
from .flow_decoder import LocationWhitening
from .model import CFlowModel
from .outputs import replacing
from .scoring import fit_constants


NONFINITE_PATIENCE = 10  # skipped steps in a row before the learning rate is halved
# The training state leaves out the model's tensors under this prefix: the encoder is frozen (no gradients,
# always in eval mode, so not even its batch-norm statistics move) and rebuilt from the pretrained weights
# that the config names, so saving it would only make every per-epoch save larger.
FROZEN_PREFIX = "encoder."


class _Decoded(Dataset):
    """Image i of a dataset as (i, uint8 [3, H, W], finite), decoded where the loader runs it (a
    worker process, or the main one). uint8 cannot hold NaN and a silent cast would train on
    garbage, so an image with non-finite values comes back as zeros with finite=False."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor, bool]:
        img = self.dataset[i]["image"]
        finite = bool(torch.isfinite(img).all())
        return i, (img if finite else torch.zeros_like(img)).mul(255).round().to(torch.uint8), finite


class _Uncached:
    """Batch sampler of `_Images`: the images of each batch of the current pass that it must decode,
    skipping batches with none (an empty batch would reach the loop as no batch at all)."""

    def __init__(self, images: "_Images"):
        self.images = images

    def __iter__(self):
        return (todo for todo in self.images.todo if todo)

    def __len__(self) -> int:
        return sum(1 for todo in self.images.todo if todo)


class _Images:
    """The training images, decoded by `compute.loader_workers` processes (persistent across epochs,
    until `close` or the end of a `with` block) and kept as uint8 in memory up to a byte budget.
    `batches(order)` gives [0, 1] float batches on the compute device, NaN for images with non-finite
    values (remembered in `nonfinite`); a batch crosses to the device as uint8, a quarter of the bytes."""

    def __init__(self, dataset: Dataset, budget_bytes: int, compute: Compute):
        self.dataset, self.budget, self.compute = dataset, budget_bytes, compute
        self.cache: dict[int, torch.Tensor] = {}
        self.nonfinite: set[int] = set()
        self.todo: list[list[int]] = []  # per batch of the current pass, the images not cached at its start
        self._loader = None

    def __len__(self) -> int:
        return len(self.dataset)

    def __enter__(self) -> "_Images":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Stop the loader's workers: the loader and these images refer to each other (`_Uncached`), so
        without this they would outlive training until a garbage collection."""
        if self._loader is not None:
            D.shut_down(self._loader)
            self._loader = None

    def _decoded(self) -> Iterator[list]:
        if not any(self.todo):  # all in memory: no loader needed
            return iter(())
        if self._loader is None:  # unpinned: the cache keeps what it reads, and page-locked memory is scarce
            self._loader = D.image_loader(_Decoded(self.dataset), self.compute, batch_sampler=_Uncached(self),
                                          collate=list, pin=False)
        return D.checked(self._loader)

    def batches(self, order: Iterable[torch.Tensor]) -> Iterator[torch.Tensor]:
        order = list(order)
        # fixed at the start of the pass: workers sample batches ahead while the cache still grows
        self.todo = [[i for i in idx.tolist() if i not in self.cache] for idx in order]
        decoded = self._decoded()
        for idx, todo in zip(order, self.todo):
            fresh = {}
            for i, img, finite in (next(decoded) if todo else []):
                if not finite:
                    self.nonfinite.add(i)
                if (len(self.cache) + 1) * img.numel() <= self.budget:
                    self.cache[i] = img
                fresh[i] = img
            imgs = [fresh[i] if i in fresh else self.cache[i] for i in idx.tolist()]
            # stacked straight into page-locked memory on a GPU, so that the copy runs asynchronously
            pinned = torch.empty((len(imgs), *imgs[0].shape), dtype=torch.uint8, pin_memory=self.compute.pin_memory)
            batch = self.compute.put(torch.stack(imgs, out=pinned)).float() / 255
            bad = [row for row, i in enumerate(idx.tolist()) if i in self.nonfinite]
            if bad:
                batch[bad] = float("nan")
            yield batch


def learning_rate(config: CFlowConfig, epoch: float, total_epochs: int) -> float:
    """Linear warm-up from lr/10, then cosine annealing down to lr/1000 (per image batch)."""
    lr, eta_min, warm = config.lr, config.lr * 1e-3, min(config.warmup_epochs, total_epochs)
    if epoch < warm:
        return lr / 10 + (lr - lr / 10) * epoch / warm
    progress = (epoch - warm) / max(total_epochs - warm, 1e-8)
    return eta_min + (lr - eta_min) * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def steps_per_pass(config: CFlowConfig, n_images: int) -> list[int]:
    """Optimiser steps each scale's flow takes in one pass over `n_images` (as `location_chunks` cuts
    each image batch): a coarse map packs many images into a step, so it takes the fewest."""
    h, w = config.image_size
    full, rest = divmod(n_images, config.batch_size)
    batches = [config.batch_size] * full + ([rest] if rest else [])
    return [sum(math.ceil(b / max(1, config.fiber_batch // ((h // s) * (w // s)))) for b in batches)
            for s in config.strides]


def meta_epochs(config: CFlowConfig, n_images: int) -> int:
    """`config.epochs`, raised until every flow takes at least `config.min_steps` optimiser steps, so
    that a set of a few dozen images trains its flows about as long as a set of hundreds."""
    per_meta = min(steps_per_pass(config, n_images)) * config.sub_epochs
    return max(config.epochs, math.ceil(config.min_steps / max(per_meta, 1)))


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
    order = torch.rand(b, locations, generator=gen).argsort(0).to(fibers.device)  # drawn on the CPU: any device
    shuffled = fibers.gather(0, order[..., None].expand(-1, -1, d))
    return shuffled.split(max(1, fiber_batch // locations))


class _Features:
    """Encoder features of the training images, per index batch.

    Without rotation the features never change, so one encoder pass fills a cache on the compute
    device (up to a byte budget) and training is decoder-only afterwards. The same pass accumulates
    the per-location moments that fit the location whitening.
    """

    def __init__(self, model: CFlowModel, images: _Images, config: CFlowConfig, fit_whitening: bool,
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
        moments = [None] * len(model.whitenings) if fit_whitening else None
        order = _batches(len(images), config.batch_size)
        for idx, x in zip(order, tqdm(images.batches(order), total=len(order), desc="features", disable=not progress,
                                      leave=False)):
            feats = model.features(x)
            if fit_whitening:
                finite = _finite_rows(feats)
                mine = real[idx].to(finite.device)
                self.dropped += int((~finite & mine).sum())
                moments = [LocationWhitening.add_moments(a, LocationWhitening.moments(f[finite & mine].flatten(2).transpose(1, 2)))
                           for a, f in zip(moments, feats)]
            if keep and self.cache is None:  # filled in place: concatenating batches would need twice the budget
                per_image = sum(f[0].numel() * f.element_size() for f in feats)
                keep = per_image * len(images) <= budget_bytes
                self.cache = [f.new_empty((len(images), *f.shape[1:])) for f in feats] if keep else None
            if keep:
                for c, f in zip(self.cache, feats):
                    c[idx.to(c.device)] = f
        if fit_whitening:
            n_real = int(all_reduce(torch.tensor(int(real.sum())), "sum"))
            self.dropped = int(all_reduce(torch.tensor(self.dropped), "sum"))
            moments = [tuple(all_reduce(v, "sum") for v in mk) for mk in moments]
            if self.dropped:
                log(f"warning: {self.dropped} training image(s) with non-finite features left out of the whitening fit")
            if self.dropped == n_real:
                raise CflowInputError("every training image gave non-finite features: check the training images")
            for w, mk in zip(model.whitenings, moments):
                w.fit_moments(mk, n_real - self.dropped, config.whitening_eps, config.whitening_shrinkage)
        if keep:
            images.cache.clear()  # never read again: the features stand in for them

    def epoch(self, order: list[torch.Tensor], gen: torch.Generator | None = None) -> Iterator[list[torch.Tensor]]:
        """Features of each index batch of `order`, in turn; with `gen` (training) the images are randomly
        rotated first, drawing from `gen` as each batch is asked for."""
        if self.cache is not None:
            for idx in order:
                yield [c[idx.to(c.device)] for c in self.cache]
            return
        for x in self.images.batches(order):
            if gen is not None:
                x = _rotate(x, self.config.rotation, gen)
            yield self.model.features(x)


@torch.no_grad()
def log_density_maps_of(model: CFlowModel, features: _Features, n: int, batch_size: int) -> list[torch.Tensor]:
    """Per-scale log-density maps [N, h_k, w_k] of the n images that `features` encodes."""
    model.eval()
    parts: list[list[torch.Tensor]] = [[] for _ in model.decoders]
    for feats in features.epoch(_batches(n, batch_size)):
        for k, lm in enumerate(model.log_density_maps(feats)):
            parts[k].append(lm)
    return [torch.cat(p) for p in parts]


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


def _new_history() -> dict:
    return {"epoch_loss": [], "epoch_seconds": [], "val_nll": [], "skipped_steps": 0, "dropped_images": 0,
            "lr_scale": 1.0}


@dataclass
class TrainState:
    """Where a run stands, saved after every epoch and on SIGINT/SIGTERM; `--resume` continues from it.
    `order` is the current epoch's batch order (None between epochs) and `batch` the next batch in it;
    the loss sums and image count are the current epoch's so far."""

    epoch: int = 0
    batch: int = 0
    order: list[torch.Tensor] | None = None
    loss_sum: float = 0.0
    loss_steps: int = 0
    seen: int = 0
    skipped_in_row: int = 0  # non-finite steps in a row, towards NONFINITE_PATIENCE
    history: dict = field(default_factory=_new_history)
    best_nll: float = math.inf
    best: dict | None = None  # the decoders of the best meta-epoch (with a validation split)

    def next_epoch(self) -> None:
        self.epoch, self.batch, self.order = self.epoch + 1, 0, None
        self.loss_sum, self.loss_steps, self.seen = 0.0, 0, 0


def _save_state(path: Path, state: dict) -> None:
    """Atomically (temp file + rename): a kill mid-write leaves the previous state intact."""
    with replacing(path) as tmp:
        torch.save(state, tmp)


def load_state(path: Path, config: CFlowConfig) -> dict:
    """The training state saved in `path`, if it was saved with the same options as `config`; the
    memory budget may differ (a run stopped for lack of memory can resume with a smaller one), and
    so may the device: tensors load on the CPU and move to wherever the run computes."""
    try:
        state = torch.load(path, weights_only=True, map_location="cpu")  # tensors and plain containers only
        saved = CFlowConfig.from_dict(json.loads(state["config"])).replace(memory_mb=config.memory_mb)
    except Exception as exc:  # a truncated or foreign file: torch, json and the config raise many types
        raise CflowInputError(f"the training state in '{path}' is damaged ({type(exc).__name__}): delete it, or rerun"
                              " without --resume to start over") from None
    if saved != config:
        raise CflowInputError(f"the training state in '{path}' was saved with other options: "
                              "rerun with the same options, or without --resume to start over")
    if any(f.name not in state for f in fields(TrainState)):
        raise _another_version(path)
    return state


def _another_version(path: Path) -> CflowInputError:
    return CflowInputError(f"the training state in '{path}' was saved by another version of cflow-ad: "
                           "rerun without --resume to start over")


def _finite_rows(features: list[torch.Tensor]) -> torch.Tensor:
    """[B] True for the images whose features are finite at every scale."""
    return torch.stack([torch.isfinite(f).flatten(1).all(1) for f in features]).all(0)


class _Run:
    """One training run of `fit`, in named steps: the encoder pass (in the constructor), an epoch, an
    image batch, an optimiser step, and the state saving."""

    def __init__(self, model: CFlowModel, train_set: Dataset, val_set: Dataset | None, compute: Compute,
                 progress: bool, log: Callable[[str], None], state_path: Path | None, resume: bool,
                 on_epoch: Callable[[int, CFlowModel], None] | None, opened: contextlib.ExitStack):
        cfg = self.cfg = model.config
        self.compute = compute
        self.model, self.progress, self.log, self.state_path, self.on_epoch = model, progress, log, state_path, on_epoch
        saved = load_state(state_path, cfg) if resume and state_path is not None and state_path.is_file() else None
        torch.manual_seed(cfg.seed)
        self.gen = torch.Generator().manual_seed(cfg.seed)
        self.rank, self.world = rank_world()
        mine, real = shard(len(train_set))  # all images in one process
        budget = cfg.memory_mb * 2**20
        self.images = opened.enter_context(
            _Images(train_set if self.world == 1 else Subset(train_set, mine), budget // 3, compute))
        self.features = _Features(model, self.images, cfg, fit_whitening=True, progress=progress,
                                  budget_bytes=budget * 2 // 3, log=log, real=torch.tensor(real))
        # the same global batch whatever the number of ranks
        self.batch_size, self.fiber_batch = max(1, cfg.batch_size // self.world), max(1, cfg.fiber_batch // self.world)
        # validation runs once a meta-epoch: its images are decoded and encoded again rather than cached
        self.val = None if not val_set else _Features(model, opened.enter_context(_Images(val_set, 0, compute)),
                                                      cfg.replace(rotation=0.0), False)
        self.val_size = len(val_set) if val_set else 0
        self.params = [p for p in model.decoders.parameters() if p.requires_grad]
        self.opt = torch.optim.Adam(self.params, lr=cfg.lr, fused=True)  # one kernel a step: unfused is a third slower
        self.meta_epochs = meta_epochs(cfg, len(train_set))
        self.total_epochs = self.meta_epochs * cfg.sub_epochs
        self.n_batches = math.ceil(len(self.images) / self.batch_size)
        self.steps = decoder_steps(model.decoders)  # DDP-wrapped when distributed: gradients averaged over ranks
        self.state = TrainState()
        if saved is not None:
            self.restore(saved["model"])
            self.opt.load_state_dict(saved["optimizer"])  # Adam moves its moments to the parameters' device
            self.gen.set_state(saved["generator"])
            torch.set_rng_state(saved["torch_rng"])
            self.state = TrainState(**{f.name: saved[f.name] for f in fields(TrainState)})
            log(f"resuming at epoch {self.state.epoch + 1}/{self.total_epochs}, image batch {self.state.batch + 1}"
                f"/{self.n_batches}")
        self.history = self.state.history
        self.history["dropped_images"] = max(self.history["dropped_images"], self.features.dropped)

    def restore(self, saved: dict) -> None:
        """The model's tensors from a training state: exactly the `FROZEN_PREFIX` ones must be missing, anything
        else missing, unexpected or of another shape is a state of another version. The keys are compared
        here: `load_state_dict` does not report a missing batch-norm `num_batches_tracked`."""
        if saved.keys() != {k for k in self.model.state_dict() if not k.startswith(FROZEN_PREFIX)}:
            raise _another_version(self.state_path)
        try:
            self.model.load_state_dict(saved, strict=False)
        except RuntimeError:  # a tensor of another shape
            raise _another_version(self.state_path) from None

    def save(self) -> None:
        if self.state_path is not None and self.rank == 0:
            model = {k: v for k, v in self.model.state_dict().items() if not k.startswith(FROZEN_PREFIX)}
            _save_state(self.state_path, {
                "config": self.cfg.to_json(), "model": model, "optimizer": self.opt.state_dict(),
                "generator": self.gen.get_state(), "torch_rng": torch.get_rng_state(),
                **{f.name: getattr(self.state, f.name) for f in fields(TrainState)}})

    def step(self, k: int, fibers: torch.Tensor, log_det: torch.Tensor | None,
             size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimiser step on scale k's fiber rows that reads nothing back to the host: every rank
        runs backward (DDP's gradient all-reduce would wait forever for one that did not), and the fused
        Adam skips the update on the device when the loss or the gradient norm is not finite on any rank
        (`found_inf`, as torch.amp.GradScaler sets it). Returns the loss and that flag (1.0: skipped)."""
        loss = fiber_loss(self.model.log_likelihood(k, fibers, log_det, size, self.steps[k]), self.cfg.loss)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        grad = torch.nn.utils.get_total_norm([p.grad for p in self.params if p.grad is not None])
        found_inf = (~(torch.isfinite(loss) & torch.isfinite(grad))).float()
        if self.world > 1:
            all_reduce(found_inf, "max")  # a step is taken by all ranks or by none
        self.opt.found_inf = found_inf
        self.opt.step()
        return loss.detach(), found_inf

    def count_steps(self, losses: list[torch.Tensor], skipped: list[torch.Tensor]) -> None:
        """The bookkeeping of an image batch's steps, in step order, from one read of their losses and
        skip flags: the loss sums, the skipped steps, and the learning rate halved after
        `NONFINITE_PATIENCE` skipped steps in a row (from the next image batch on, as it is set per batch)."""
        s, h = self.state, self.history
        losses, skipped = (t.tolist() for t in self.compute.host(torch.stack(losses), torch.stack(skipped)))
        for value, skip in zip(losses, skipped):
            if not skip:
                s.skipped_in_row = 0
                s.loss_sum += value
                s.loss_steps += 1
                continue
            s.skipped_in_row += 1
            h["skipped_steps"] += 1
            if s.skipped_in_row == NONFINITE_PATIENCE:
                h["lr_scale"] /= 2
                s.skipped_in_row = 0
                self.log(f"warning: {NONFINITE_PATIENCE} non-finite steps in a row: learning rate halved"
                         f" (x{h['lr_scale']:g})")

    def image_batch(self, feats: list[torch.Tensor]) -> None:
        """The steps of one image batch: images with non-finite features dropped, then each scale's
        fibers in random chunks of whole location sets, queued without a host read per step (a GPU
        would idle at each), then counted."""
        finite = _finite_rows(feats)
        if self.world > 1 and any_rank(not finite.all()):  # ranks must take the same steps: all skip it
            finite = torch.zeros_like(finite)
        if not finite.all():
            bad = int((~finite).sum())
            self.history["dropped_images"] += bad
            self.log(f"warning: {bad} image(s) with non-finite features left out of this batch"
                     f" ({self.history['dropped_images']} so far)")
            feats = [f[finite] for f in feats]
        losses, skipped = [], []
        for k, f in enumerate(feats):
            if f.shape[0] == 0:
                continue
            fibers, log_det = self.model.fibers(k, f)
            for chunk in location_chunks(fibers, self.fiber_batch, self.gen):
                loss, found_inf = self.step(k, chunk, log_det, tuple(f.shape[-2:]))
                losses.append(loss)
                skipped.append(found_inf)
        if losses:
            self.count_steps(losses, skipped)

    def epoch(self, stop: "_StopRequests") -> None:
        """The rest of the current epoch (all of it unless resumed mid-way), then its bookkeeping."""
        s, cfg = self.state, self.cfg
        self.model.train()  # the encoder stays in eval mode; leaving eval later refolds the decoders
        if s.order is None:
            s.order = _batches(len(self.images), self.batch_size, self.gen)
        t0 = time.perf_counter()
        bar = tqdm(total=self.n_batches, initial=s.batch, desc=f"epoch {s.epoch + 1}/{self.total_epochs}",
                   disable=not self.progress, leave=False)
        todo = s.order[s.batch:]
        for idx, feats in zip(todo, self.features.epoch(todo, self.gen)):
            lr = learning_rate(cfg, s.epoch + s.batch / self.n_batches, self.total_epochs) * self.history["lr_scale"]
            for group in self.opt.param_groups:
                group["lr"] = lr
            self.image_batch(feats)
            s.batch += 1
            s.seen += len(idx)
            bar.update()
            bar.set_postfix(loss=f"{s.loss_sum / max(s.loss_steps, 1):.3f}",
                            img_s=f"{s.seen / (time.perf_counter() - t0):.1f}")
            if any_rank(stop.requested):
                self.save()
                raise TrainingInterrupted(self.state_path)
        bar.close()
        self.end_epoch(time.perf_counter() - t0)

    def end_epoch(self, seconds: float) -> None:
        """Epoch loss over all ranks, the log line, `on_epoch`, validation at the end of a meta-epoch."""
        s, h, cfg = self.state, self.history, self.cfg
        total = all_reduce(torch.tensor([s.loss_sum, float(s.loss_steps)], dtype=torch.float64))
        loss_sum, loss_n = (float(v) for v in total)
        if loss_n == 0:
            raise CflowInputError("every training step of an epoch had a non-finite loss or gradient: check the"
                                  " training images, or lower --lr")
        h["epoch_loss"].append(loss_sum / loss_n)
        h["epoch_seconds"].append(seconds)
        self.log(f"epoch {s.epoch + 1}/{self.total_epochs}: loss {h['epoch_loss'][-1]:.4f}, {seconds:.1f} s"
                 + (f", {h['skipped_steps']} non-finite steps skipped" if h["skipped_steps"] else ""))
        if self.on_epoch is not None:
            self.on_epoch(s.epoch + 1, self.model)
        if self.val is not None and (s.epoch + 1) % cfg.sub_epochs == 0:
            val_logs = log_density_maps_of(self.model, self.val, self.val_size, cfg.batch_size)
            val_nll = -sum(lm.mean().item() for lm in val_logs) / len(val_logs)
            h["val_nll"].append(val_nll)
            self.log(f"meta-epoch {(s.epoch + 1) // cfg.sub_epochs}/{self.meta_epochs}: validation NLL per dim {val_nll:.4f}")
            if val_nll < s.best_nll:
                s.best_nll, s.best = val_nll, copy.deepcopy(self.model.decoders.state_dict())
        s.next_epoch()
        self.save()

    def finish(self) -> dict:
        """The best meta-epoch's decoders (with validation), then the stateless constants."""
        s, h = self.state, self.history
        if s.best is not None:
            self.model.decoders.load_state_dict(s.best)
            h["selected_meta_epoch"] = h["val_nll"].index(s.best_nll) + 1
        self.model.eval()
        with self.model.recording_ranges():  # the int8 export's calibration, from the same decoder passes
            fit_constants(self.model, lambda: (self.model.log_density_maps(f)
                                               for f in self.features.epoch(_batches(len(self.images), self.batch_size))))
        h["epochs"] = self.total_epochs
        return h


def fit(
    model: CFlowModel,
    train_set: Dataset,
    val_set: Dataset | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
    on_epoch: Callable[[int, CFlowModel], None] | None = None,
    state_path: str | Path | None = None,
    resume: bool = False,
    compute: Compute | None = None,
) -> dict:
    """Train the decoders of `model` in place on `compute` (default: `Compute()`, the GPU when there is
    one); returns a history with losses and timings. The model is moved to the compute device.

    With `state_path`, the whole training state (the model but its frozen encoder, optimiser, RNG
    states, `TrainState`) is written there atomically after every epoch and when SIGINT or SIGTERM
    arrives, and `resume=True` continues from it exactly: the same seed gives the same model as a run
    that was never stopped. The learning rate is a function of the position, so it needs no state of
    its own. Every random draw comes from CPU generators, so the device changes no draw.

    Non-finite values never reach the weights: images with non-finite features are dropped from
    their batch (and from the whitening fit), and a step whose loss or gradient is not finite is
    skipped (on the device: the optimiser leaves the weights and its moments as they were); after
    `NONFINITE_PATIENCE` skipped steps in a row the learning rate is halved, from the next image batch
    on (the steps' flags are read once per image batch, and the rate is set per image batch). Both are
    counted in the history and logged.

    `on_epoch(epoch, model)` runs after every epoch, outside the timed loop (benchmarks use it
    to trace accuracy over training; training itself never looks at its results).
    """
    if len(train_set) == 0:
        raise ValueError("empty training set")
    compute = compute or Compute()
    compute.place(model)
    with contextlib.ExitStack() as opened:  # the image loaders' workers stop however training ends
        run = _Run(model, train_set, val_set, compute, progress, log, Path(state_path) if state_path else None,
                   resume, on_epoch, opened)
        with _StopRequests() as stop:
            while run.state.epoch < run.total_epochs:
                run.epoch(stop)
                if any_rank(stop.requested):
                    raise TrainingInterrupted(run.state_path)
        return run.finish()


@torch.no_grad()
def fit_baseline(model: DistanceModel, train_set: Dataset, progress: bool = True, sample: int = 64,
                 compute: Compute | None = None) -> dict:
    """Fit PaDiM, SPADE or PatchCore in one encoder pass over the training images on `compute` (default:
    `Compute()`), then set the heat-map scale (`train_max_score`) from up to `sample` of them (each
    left out of its own SPADE search)."""
    cfg = model.config
    if len(train_set) < 2:
        raise ValueError("a baseline needs at least 2 training images")
    compute = compute or Compute()
    compute.place(model)
    with _Images(train_set, 0, compute) as images:  # one pass: nothing to keep
        batches = _batches(len(images), cfg.batch_size)
        t0 = time.perf_counter()
        bar = tqdm(images.batches(batches), total=len(batches), desc=f"fit {cfg.method}", disable=not progress,
                   leave=False)
        model.fit(model.features(x) for x in bar)
        seconds = time.perf_counter() - t0
        picks = torch.linspace(0, len(images) - 1, min(sample, len(images))).round().long().unique()
        picks = list(picks.split(cfg.batch_size))
        top = max(float(model.maps_from_features(model.features(x), idx)[1].max())
                  for idx, x in zip(picks, images.batches(picks)))
    model.train_max_score.fill_(max(top, 1e-6))
    return {"fit_seconds": seconds, "epochs": 0}
