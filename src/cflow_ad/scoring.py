"""Eq. 8 onwards: per-scale log-likelihood maps -> anomaly map and image score.

Per scale k the per-dimension log-likelihood l_k is turned into a probability
P_k = exp(l_k - ref_k) in (0, 1], upsampled bilinearly to the input size and summed
over scales; the anomaly map is offset - sum_k P_k, so higher means more anomalous,
and the image score is its maximum.

`stateless` fixes ref_k and offset from training data when training ends, so a score
never depends on the other images scored with it. `paper` takes them from the
evaluated set itself, as the authors' code does (ref_k = max of l_k over the set,
offset = max of the summed map).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def probability_sum(log_maps: Sequence[torch.Tensor], refs: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """sum_k upsample(exp(l_k - ref_k)) as [B, H, W]; `log_maps` are [B, h_k, w_k]."""
    total = None
    for k, lm in enumerate(log_maps):
        p = torch.exp(lm - refs[k]).unsqueeze(1)
        p = F.interpolate(p, size=size, mode="bilinear", align_corners=True).squeeze(1)
        total = p if total is None else total + p
    return total


def anomaly_maps(
    log_maps: Sequence[torch.Tensor], refs: torch.Tensor, offset: torch.Tensor | float, size: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """(anomaly map [B, H, W], image score [B]) for fixed normalisation constants."""
    amap = offset - probability_sum(log_maps, refs, size)
    return amap, amap.flatten(1).amax(1)


def paper_constants(log_maps: Sequence[torch.Tensor], size: tuple[int, int], chunk: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """The authors' constants taken over a whole evaluated set: (refs [K], offset)."""
    refs = torch.stack([lm.max() for lm in log_maps])
    n = log_maps[0].shape[0]
    offset = max(
        probability_sum([lm[i : i + chunk] for lm in log_maps], refs, size).max().item() for i in range(0, n, chunk)
    )
    return refs, torch.tensor(offset)


def score_set(
    log_maps: Sequence[torch.Tensor],
    size: tuple[int, int],
    mode: str,
    refs: torch.Tensor | None = None,
    offset: torch.Tensor | float | None = None,
    chunk: int = 64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Anomaly maps [N, H, W] and scores [N] for a whole set of per-scale log maps [N, h_k, w_k]."""
    if mode == "paper":
        refs, offset = paper_constants(log_maps, size, chunk)
    elif refs is None or offset is None:
        raise ValueError("stateless scoring needs the constants fixed at training time")
    maps, scores = [], []
    for i in range(0, log_maps[0].shape[0], chunk):
        m, s = anomaly_maps([lm[i : i + chunk] for lm in log_maps], refs, offset, size)
        maps.append(m)
        scores.append(s)
    return torch.cat(maps), torch.cat(scores)
