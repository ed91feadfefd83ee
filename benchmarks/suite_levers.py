"""Levers judged on the development suite: each variant of the base config on every set under --data.

Each variant runs as `cflow-ad experiment suite` (trained as `cflow-ad train` trains, with the
calibration hold-out; stored runs are reused, so an interrupted run resumes). Prints, and writes
to OUTPUT/levers.md, one row per variant: its mean over the sets of each metric, the training
seconds summed over the sets, and every set's figures (image AUROC / pixel AUROC / AUPRO).

    python benchmarks/suite_levers.py --variants base taps-4-8-16 --seeds 0
"""

from __future__ import annotations

import argparse
from pathlib import Path

from cflow_ad import api, experiments
from cflow_ad.checkpoint import load_checkpoint
from cflow_ad.config import CFlowConfig
from cflow_ad.source import DataSource

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

# Changes to the base config (the defaults): issue 31's suspects.
VARIANTS: dict[str, dict] = {
    "base": {},
    "taps-8-16-32": {"last_stride": 32, "pool_layers": 3},
    "taps-4-8-16": {"last_stride": 16, "pool_layers": 3},
    "taps-4-8-16-32": {"last_stride": 32, "pool_layers": 4},
    "taps-4-8": {"last_stride": 8, "pool_layers": 2},
    "min-steps-100": {"min_steps": 100},
    "min-steps-200": {"min_steps": 200},
    "min-steps-400": {"min_steps": 400},
    "epochs-1": {"epochs": 1},
    "ledoit-wolf": {"whitening_shrinkage": "ledoit-wolf"},
    "ridge-0.01": {"whitening_shrinkage": "ridge", "whitening_eps": 0.01},
    "ridge-0.1": {"whitening_shrinkage": "ridge", "whitening_eps": 0.1},
    "ridge-1": {"whitening_shrinkage": "ridge", "whitening_eps": 1.0},
    "no-whitening": {"whitening": "none"},
    "4-couplings": {"coupling_layers": 4},
    "condition-64": {"condition_dim": 64},
    "320px": {"image_size": (320, 320)},
}

# Score-time changes: the base variant's stored models scored again, not retrained (same AUROCs as a
# retrained model; their thresholds were calibrated for the base's score, so they are left out).
RESCORED: dict[str, dict] = {"image-score-map": {"image_score": "map"}, "image-score-location": {"image_score": "location"},
                             "blur-0": {"blur_sigma": 0.0}, "blur-2": {"blur_sigma": 2.0}, "blur-4": {"blur_sigma": 4.0}}


def rescored(base_payload: dict, changes: dict, data: list[Path]) -> dict:
    """The suite payload of the base variant's models with `changes` to their stored config at test time."""
    rows = []
    for row in base_payload["rows"]:
        runs = []
        for run in row["runs"]:
            model = load_checkpoint(run["checkpoint"])
            stored = CFlowConfig.from_dict(run["config"])  # what the run was trained and tested with
            model.config, model.thresholds = stored.replace(**changes), None
            cat = next(c for c in experiments.categories(data) if c.name == row["category"])
            metrics = api.test(model, None, DataSource(cat.root, cat.category), progress=False)
            runs.append({**run, **{k: metrics[k] for k in experiments.METRICS}})
        rows.append({**row, "runs": runs, **{k: experiments._mean([r[k] for r in runs]) for k in experiments.METRICS}})
    return {"rows": rows, "mean": {k: experiments._mean([r[k] for r in rows]) for k in experiments.METRICS}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, nargs="+", default=[DATA], help="development roots (default: ../shared/data)")
    p.add_argument("--output", type=Path, default=Path("runs/suite_levers"))
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=[*VARIANTS, *RESCORED],
                   help="variants to run; the first is the base that score-time variants rescore")
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--categories", nargs="+", help="only these sets (default: all)")
    p.add_argument("--base", nargs="*", default=[], metavar="FIELD=VALUE",
                   help="changes to the defaults that every variant starts from, e.g. last_stride=16")
    args = p.parse_args()
    base = CFlowConfig()
    for item in args.base:
        name, value = item.split("=", 1)
        base = base.replace(**{name: type(getattr(base, name))(value)})
    rows = []
    for name in args.variants:
        if name in RESCORED:
            rows.append((name, rescored(rows[0][1], RESCORED[name], args.data)))
            continue
        config = base.replace(**VARIANTS[name])
        rows.append((name, experiments.suite(config, args.data, args.categories, args.output / name, args.seeds,
                                             log=lambda m: print(m, flush=True))))
    sets = [r["category"] for r in rows[0][1]["rows"]]

    def cell(values: dict) -> str:
        return " / ".join(experiments._pct([values.get(k)]) for k in experiments.METRICS)

    changed = ", ".join(args.base) or "the defaults"
    lines = [f"Base: {changed}; seeds {', '.join(map(str, args.seeds))} (mean). Image AUROC / pixel AUROC / AUPRO (%);"
             " mean over the sets (pixel metrics: those with masks); training s summed over the sets.", "",
             "| variant | mean | training s | " + " | ".join(sets) + " |", "|---" * (3 + len(sets)) + "|"]
    for name, payload in rows:
        per_set = {r["category"]: r for r in payload["rows"]}
        seconds = sum(r["train_seconds"] for r in payload["rows"])
        lines.append(f"| {name} | **{cell(payload['mean'])}** | {seconds:.0f} | "
                     + " | ".join(cell(per_set[s]) if s in per_set else "n/a" for s in sets) + " |")
    table = "\n".join(lines) + "\n"
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / "levers.md").write_text(table)
    print(table)
    if len(rows) > 1:
        base_mean = rows[0][1]["mean"]
        for name, payload in rows[1:]:
            gains = [experiments._pct([payload["mean"][k] - base_mean[k]]) if base_mean[k] is not None else "n/a"
                     for k in experiments.METRICS]
            print(f"{name}: {' / '.join(gains)} points against {rows[0][0]}")


if __name__ == "__main__":
    main()
