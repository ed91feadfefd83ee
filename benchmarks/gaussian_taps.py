"""Per-location Gaussian (location whitening without a flow) per MobileNetV2 tap and tap set.

Scores every test image with the whitening's log-density alone, combined over scales as Eq. 8
does, to show which taps the per-location statistics suit. One encoder pass over all images.

    python benchmarks/gaussian_taps.py
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torchvision.models.feature_extraction import create_feature_extractor

from cflow_ad.encoder import IMAGENET_MEAN, IMAGENET_STD, load_backbone
from cflow_ad.flow_decoder import LocationWhitening
from cflow_ad.metrics import evaluate
from cflow_ad.scoring import score_set
from cflow_ad.source import DataSource

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "magnetic_tile"
TAPS = ["features.3", "features.6", "features.13", "features.14", "features.16", "features.17"]
SETS = [["features.6", "features.13", "features.17"], ["features.6", "features.13", "features.16"],
        ["features.6", "features.13", "features.14"], ["features.3", "features.6", "features.13"]]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=DATA)
    p.add_argument("--category", default="magnetic_tile")
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--ridge", type=float, default=0.01)
    args = p.parse_args()
    torch.set_num_threads(2)
    body = create_feature_extractor(load_backbone("mobilenet_v2", None), {t: t for t in TAPS}).eval()
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)

    def encode(split):
        ds = DataSource(args.data, args.category).open(split, args.image_size)
        feats, labels, masks, kinds = {t: [] for t in TAPS}, [], [], []
        for b in torch.utils.data.DataLoader(ds, batch_size=16):
            with torch.no_grad():
                out = body((b["image"] - mean) / std)
            for t in TAPS:
                feats[t].append(out[t])
            labels += b["label"].tolist()
            masks.append(b["mask"][:, 0] > 0.5)
            kinds += b["defect_type"]
        return {t: torch.cat(v) for t, v in feats.items()}, labels, torch.cat(masks), kinds

    train, _, _, _ = encode("train")
    test, labels, masks, kinds = encode("test")
    logs = {}
    for t in TAPS:
        n, d, h, w = train[t].shape
        layer = LocationWhitening(h * w, d)
        layer.fit_moments(*LocationWhitening.moments(train[t].flatten(2).transpose(1, 2)), n, args.ridge)

        def log_density(f):
            z, log_det = layer(f.flatten(2).transpose(1, 2))
            return ((-0.5 * z.square().sum(-1) + log_det) / d).view(-1, h, w)  # constant 2*pi term dropped

        logs[t] = (log_density(train[t]), log_density(test[t]))
    size = (args.image_size, args.image_size)
    print("| taps | image AUROC | pixel AUROC | AUPRO |\n|---|---|---|---|")
    for taps in [[t] for t in TAPS] + SETS:
        tr, te = [logs[t][0] for t in taps], [logs[t][1] for t in taps]
        refs = torch.stack([lm.max() for lm in tr])
        neg, _ = score_set(tr, size, "stateless", refs, 0.0)
        maps, scores = score_set(te, size, "stateless", refs, -neg.amin())
        m = evaluate(labels, scores.numpy(), masks.numpy(), maps.numpy(), kinds)
        print(f"| {' + '.join(taps)} | {100 * m['image_auroc']:.1f} | {100 * m['pixel_auroc']:.1f} | {100 * m['aupro']:.1f} |",
              flush=True)


if __name__ == "__main__":
    main()
