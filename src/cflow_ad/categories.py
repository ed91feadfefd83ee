"""One model per product: `cflow-ad train --category all` over every category (or STC scene) of a root.

Categories train one after another, or `jobs` at a time in separate processes that share the
cores. Each writes OUTPUT/<category>/model.safetensors and, where the category has a test split,
its test metrics. A failing category is recorded with its one-line error and the others go on.
The summary (summary.md, summary.json) names every category with its outcome.
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import time
import traceback
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

from .config import CFlowConfig
from .errors import CflowInputError
from .outputs import check_writable, percent, to_json, write_text
from .source import DataSource


def categories_of(source: DataSource) -> list[str]:
    """The categories under an MVTec-layout root, or the scenes of an STC root."""
    if source.data is None:
        raise CflowInputError("--category all needs --data ROOT: an MVTec-layout or STC root")
    found = source.categories()
    if not found:
        raise CflowInputError(
            f"no categories in '{source.data}': expected <root>/<category>/train/good, or training/frames/")
    return found


def _one(config: CFlowConfig, source: DataSource, output: str, threads: int | None, resume: bool,
         compute: dict | None = None) -> dict:
    """Train (and test, where there is a test split) the category of `source`; never raises. `compute`:
    the api's device / precision / workers keywords."""
    from . import api
    from .device import set_threads

    compute = compute or {}
    if threads:
        set_threads(threads)
    category = source.category
    folder = Path(output) / category
    row = {"category": category, "status": "ok", "error": "", "checkpoint": str(folder / "model.safetensors")}
    t0 = time.perf_counter()
    try:
        path = api.train(config, folder, source, progress=False, log=lambda m: None, resume=resume, **compute)
        row["train_seconds"] = round(time.perf_counter() - t0, 1)
        if source.has_test():
            m = api.test(path, folder / "test", source, progress=False, **compute)
            row.update({k: m[k] for k in ("image_auroc", "pixel_auroc", "aupro")})
            row.update(image_fpr=m.get("at_threshold", {}).get("image_fpr"),
                       image_recall=m.get("at_threshold", {}).get("image_recall"))
    except CflowInputError as exc:
        row.update(status="failed", error=str(exc))
    except Exception as exc:  # a bug or a resource error in one category must not stop the others
        row.update(status="failed", error=f"{type(exc).__name__}: {exc}".splitlines()[0],
                   traceback=traceback.format_exc())
    row.setdefault("train_seconds", round(time.perf_counter() - t0, 1))
    return row


def summary_markdown(rows: list[dict]) -> str:
    lines = ["| category | status | image AUROC | pixel AUROC | AUPRO | FPR on good | recall | seconds | error |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        figures = " | ".join(percent(r.get(k)) for k in ("image_auroc", "pixel_auroc", "aupro", "image_fpr", "image_recall"))
        lines.append(f"| {r['category']} | {r['status']} | {figures} | {r['train_seconds']} | {r['error']} |")
    failed = sum(r["status"] != "ok" for r in rows)
    return "\n".join(lines) + f"\n\n{len(rows) - failed} of {len(rows)} categories trained, {failed} failed.\n"


def train_all(config: CFlowConfig, source: DataSource, output: str | Path, jobs: int = 1, threads: int | None = None,
              resume: bool = False, log: Callable[[str], None] = print, **compute) -> list[dict]:
    """Train every category of the root of `source` (its category is ignored) into `output/<category>/`
    and test each on its test split; returns one summary row per category. `compute`: device,
    precision, workers as for `api.train`."""
    names = categories_of(source)
    out = check_writable(output)
    per_job = max(1, (threads or 1) // jobs) if threads else None
    args = [(config, dataclasses.replace(source, category=name), str(out), per_job, resume, compute) for name in names]
    rows: list[dict] = []

    def done(row: dict) -> None:
        rows.append(row)
        log(f"[{len(rows)}/{len(names)}] {row['category']}: {row['status']}"
            + (f" ({row['error']})" if row["error"] else f", image AUROC {percent(row.get('image_auroc'))}"))

    if jobs <= 1:
        for a in args:
            done(_one(*a))
    else:  # fresh interpreters: forking a process that has started torch's thread pools can deadlock
        with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            for future in as_completed([pool.submit(_one, *a) for a in args]):
                done(future.result())
    rows.sort(key=lambda r: names.index(r["category"]))
    write_text(out / "summary.json", to_json(rows))
    write_text(out / "summary.md", summary_markdown(rows))
    return rows
