"""A self-contained HTML report of a `cflow-ad test` output folder.

`write_test_artifacts` (called by `api.test`) stores what metrics.json and scores.csv lack: the ROC
and PRO curves (curves.json) and overlays of the worst-scored images (cases/). `write_report` turns
the folder into one HTML file with every figure embedded, so it can be mailed or archived and still
opens offline.
"""

from __future__ import annotations

import base64
import csv
import heapq
import io
import json
from html import escape
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure

from .data import load_image
from .errors import CflowInputError
from .metrics import FPR_LIMIT
from .outputs import OutputFolder, check_writable_file, percent, to_json, write_text
from .regions import defect_regions
from .thresholds import ScoreScale, Thresholds
from .visualize import colour_bar, draw_boxes, heat_rgb, outline, overlay_rgb, png_bytes, save_png

GT_OUTLINE = np.array([0, 255, 0], dtype=np.uint8)  # green: white marks predicted defects in predict's overlays


class WorstCases:
    """The `k` highest-scored good images (false positives first) and the `k` lowest-scored defect
    images of a set seen batch by batch, each with its map and mask: the cases a report shows,
    kept without keeping the set."""

    def __init__(self, k: int = 4):
        self.k = k
        self.fp: list[tuple] = []  # heaps of (key, order, row): the root is the case to drop first
        self.fn: list[tuple] = []
        self.seen = 0

    def add(self, maps: torch.Tensor, scores: torch.Tensor, masks: torch.Tensor, labels, types, paths) -> None:
        for i, s in enumerate(scores.tolist()):
            heap, key = (self.fp, s) if int(labels[i]) == 0 else (self.fn, -s)
            rank = (key, -self.seen)  # equal scores: the earlier image stays, as a stable sort keeps it
            self.seen += 1
            if len(heap) == self.k and rank <= heap[0][:2]:
                continue
            item = (*rank, (maps[i].clone(), masks[i].clone(), int(labels[i]), str(types[i]), str(paths[i]), s))
            (heapq.heappush if len(heap) < self.k else heapq.heapreplace)(heap, item)

    def worst(self, kind: str) -> list[tuple]:
        """Rows (map, mask, label, type, path, score), worst first; kind 'fp' or 'fn'."""
        return [row for *_, row in sorted(self.fp if kind == "fp" else self.fn, key=lambda t: t[:2], reverse=True)]


def write_test_artifacts(folder: OutputFolder, curves: dict, cases: WorstCases, image_size: int,
                         thresholds: Thresholds | None, heat_scale: ScoreScale) -> None:
    """curves.json (from `metrics.Evaluation.curves`) and cases/ (overlays of the worst cases on `heat_scale`, with
    the defect regions that `predict` would report drawn as boxes), each file written whole into `folder`."""
    folder.write_text("curves.json", to_json(curves, indent=None))
    rows = []
    for kind, tag in (("false positive", "fp"), ("false negative", "fn")):
        for rank, (amap, mask, label, dtype, path, score) in enumerate(cases.worst(tag), 1):
            rgb = overlay_rgb(load_image(path, image_size), heat_rgb(amap, heat_scale))
            rgb[outline(mask.numpy())] = GT_OUTLINE
            flagged = None if thresholds is None else score > thresholds.image  # api.test's verdict rule
            if flagged:
                draw_boxes(rgb, [r["box"] for r in defect_regions(amap.numpy(), thresholds.region_threshold)[1]])
            name = f"{tag}{rank}.png"
            save_png(rgb, folder.file(f"cases/{name}"))
            rows.append({"file": name, "path": path, "defect_type": dtype, "label": label,
                         "score": None if thresholds is None else thresholds.normalized(score), "raw_score": score,
                         "kind": kind, "wrong": None if flagged is None else flagged == (kind == "false positive")})
    folder.write_text("cases/cases.json", to_json(rows))


def _need(results: Path, name: str) -> Path:
    path = results / name
    if not path.is_file():
        raise CflowInputError(f"{path} not found: rerun 'cflow-ad test --output {results}' to write the report's inputs")
    return path


def _num(v) -> str:
    return "n/a" if v is None else escape(f"{v:.4g}" if isinstance(v, float) else str(v))


def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _figure_uri(fig: Figure) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    return _data_uri(buf.getvalue())


def _table(head: list[str], rows: list[list[str]]) -> str:
    """An HTML table from already escaped cells."""
    th = "".join(f"<th>{h}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><tr>{th}</tr>{body}</table>"


def _curves_figure(curves: dict, metrics: dict) -> str:
    no_masks = metrics.get("images_used", {}).get("pixel_metrics") == 0
    fig = Figure(figsize=(13.5, 4.2))
    panels = (("Image ROC", curves["image_roc"], "tpr", f"AUROC {percent(metrics.get('image_auroc'))}"),
              ("Pixel ROC", curves["pixel_roc"], "tpr", f"AUROC {percent(metrics.get('pixel_auroc'))}"),
              ("PRO curve", curves["pro"], "pro", f"AUPRO {percent(metrics.get('aupro'))}"))
    for ax, (title, c, key, label) in zip(fig.subplots(1, 3), panels):
        ax.set(title=title, xlabel="false-positive rate", ylabel=key.upper(), ylim=(0, 1.02))
        if c["fpr"]:
            ax.plot(c["fpr"], c[key], lw=2, label=label)
        else:
            why = "n/a: no image has a mask" if no_masks and title != "Image ROC" else "undefined: one class only"
            ax.text(0.5, 0.5, why, ha="center", transform=ax.transAxes)
        if key == "tpr":
            ax.plot([0, 1], [0, 1], ":", color="grey", label="chance")
            ax.set_xlim(0, 1)
        else:
            limit = c.get("fpr_limit", FPR_LIMIT)
            ax.axvline(limit, color="red", ls="--", label=f"FPR limit {limit:g}")
            ax.set_xlim(0, limit * 1.05)
        ax.legend(loc="lower right")
        ax.grid(alpha=0.3)
    return _figure_uri(fig)


def _histogram_figure(scores: list[tuple[int, float]], threshold: float | None, scale: ScoreScale | None) -> str:
    """Image scores on the model's one scale (0 typical good, 1 the threshold), the raw score on the top axis;
    raw scores alone without a scale."""
    fig = Figure(figsize=(9, 3.8))
    ax = fig.subplots()
    raw = np.array([s for _, s in scores], dtype=np.float64)
    values = scale(raw) if scale is not None else raw
    labels = np.array([y != 0 for y, _ in scores], dtype=bool)
    bins = np.histogram_bin_edges(values, bins=40) if values.size else 10
    for defect, name, color in ((False, "normal", "tab:blue"), (True, "anomalous", "tab:red")):
        ax.hist(values[labels == defect], bins=bins, alpha=0.55, color=color, label=name)
    if threshold is not None:
        at = 1.0 if scale is not None else threshold
        ax.axvline(at, color="black", ls="--", label=f"image threshold: {at:g}" + (f" (raw {threshold:.4g})" if scale else ""))
    if scale is not None:
        ax.axvline(0.0, color="grey", ls=":", label=f"median good (raw {scale.typical:.4g})")
        top = ax.secondary_xaxis("top", functions=(lambda v: scale.raw(v), lambda r: scale(r)))
        top.set_xlabel("raw score")
        top_value, ticks = float(values.max(initial=1.0)), [0.0]
        for t in (1.0, 2.0, 3.0, 5.0, 10.0, 20.0, 40.0):  # raw labels far enough apart to read
            if t <= top_value and t - ticks[-1] >= top_value / 10:
                ticks.append(t)
        top.set_xticks([float(scale.raw(t)) for t in ticks], [f"{float(scale.raw(t)):.3g}" for t in ticks])
    ax.set(title="Image scores", xlabel="score (0: median good, 1: threshold; log above)" if scale else "score",
           ylabel="images")
    ax.legend()
    return _figure_uri(fig)


def _regions_html(rates: dict) -> str:
    """The defect regions at the thresholds: false alarms on good images, recall of ground-truth defects."""
    if rates.get("region_false_alarm_rate") is None and rates.get("region_recall") is None:
        return ""
    rows = [[escape(t), str(r["images"]), str(r["images_with_regions"]),
             percent(r.get("region_false_alarm_rate")) if t == "good" else "", percent(r.get("region_recall"))]
            for t, r in rates.get("regions_per_type", {}).items()]
    rows.append(["<b>all</b>", "", "", percent(rates.get("region_false_alarm_rate")), percent(rates.get("region_recall"))])
    return ("<h3>Defect regions</h3><p class=info>The regions <code>predict</code> reports: connected parts of the"
            " map over the region threshold, on images over the image threshold. False alarm: a good image with any"
            " region. Recall: the share of ground-truth defects (connected parts of the masks) a region overlaps.</p>"
            + _table(["images", "count", "with regions", "false-alarm rate", "region recall"], rows))


def _cases_html(results: Path, cases: list[dict], kind: str) -> str:
    cells = []
    for c in (c for c in cases if c["kind"] == kind):
        uri = _data_uri(_need(results, f"cases/{c['file']}").read_bytes())
        verdict = {None: "", True: " · <b class=bad>wrong at threshold</b>", False: " · right at threshold"}[c["wrong"]]
        score = "" if c.get("score") is None else f"score {c['score']:.3g} · "
        raw = c.get("raw_score", c.get("score"))
        cells.append(f"<figure><img src=\"{uri}\" alt=\"{escape(c['file'])}\"><figcaption>{score}raw {raw:.4g}"
                     f" · {escape(c['defect_type'])}{verdict}<br><small>{escape(Path(c['path']).name)}</small>"
                     "</figcaption></figure>")
    return "<div class=cases>" + "".join(cells) + "</div>" if cells else "<p>none in this test set</p>"


CSS = """body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1400px;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:.5em 0 1.5em}td,th{border:1px solid #ccc;padding:.3em .8em;text-align:right}
th{background:#f2f2f2}td:first-child,th:first-child{text-align:left}.info{color:#555}
img{max-width:100%}.cases{display:flex;flex-wrap:wrap;gap:1em}figure{margin:0;width:256px}
figure img{width:256px;image-rendering:pixelated}figcaption{font-size:.9em}.bad{color:#b00}
details{margin-bottom:1em}code{background:#f4f4f4}.legend{display:flex;gap:1em;align-items:center}
.legend img{width:120px}.legend p{max-width:40em}"""


def write_report(results: Path, output: Path | None = None) -> Path:
    """One HTML file, every figure embedded as a data URI, from a `cflow-ad test --output` folder."""
    res = Path(results)
    metrics = json.loads(_need(res, "metrics.json").read_text(encoding="utf-8"))
    with open(_need(res, "scores.csv"), newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        fields = set(reader.fieldnames or ())
        if not {"label", "score"} <= fields:
            raise CflowInputError(f"{res / 'scores.csv'} has no label and score columns: rerun 'cflow-ad test --output {res}'")
        raw = "raw_score" if "raw_score" in fields else "score"  # results written before the one scale
        scores = [(int(r["label"]), float(r[raw])) for r in reader]
    curves = json.loads(_need(res, "curves.json").read_text(encoding="utf-8"))
    cases = json.loads(_need(res, "cases/cases.json").read_text(encoding="utf-8"))
    # in the results folder it is listed with test's files: a rerun of test removes it with the results it shows
    path = OutputFolder(res, "test").file("report.html") if output is None else check_writable_file(output)

    info = [f"<b>{escape(k)}</b> {escape(str(metrics[k]))}" for k in ("model", "normalization", "images", "seconds")
            if metrics.get(k) is not None]
    config = metrics.get("config")
    config_html = "" if not isinstance(config, dict) else "<details><summary>configuration</summary>" + _table(
        ["option", "value"], [[escape(str(k)), escape(str(v))] for k, v in config.items()]) + "</details>"
    per_type = _table(["defect type", "image AUROC", "pixel AUROC"],
                      [[escape(t), percent(m.get("image_auroc")), percent(m.get("pixel_auroc"))]
                       for t, m in metrics.get("per_type", {}).items()])
    used = metrics.get("images_used")
    coverage = "" if not used else (f"<p class=info>image metrics on {used['image_metrics']} images, pixel metrics on"
                                    f" the {used['pixel_metrics']} of them with a mask</p>")
    thresholds, rates = metrics.get("thresholds"), metrics.get("at_threshold")
    decision, legend, scale = "", "", None
    if thresholds and thresholds.get("typical_good_score") is not None:
        scale = ScoreScale(thresholds["typical_good_score"], thresholds["image"])
    if thresholds and thresholds.get("typical_good_pixel") is not None:
        bar = _data_uri(png_bytes(colour_bar(256, ScoreScale(thresholds["typical_good_pixel"], thresholds["pixel"]))))
        legend = (f"<div class=legend><img src=\"{bar}\" alt=\"heat-map colour bar\"><p class=info>Heat-map colours,"
                  " the same on every image of this model: black is a typical good pixel, the white line the pixel"
                  " threshold, pale yellow a clear defect (values above stay pale yellow). Yellow boxes: the defect"
                  " regions <code>predict</code> reports at the thresholds; green outline: the ground truth.</p></div>")
    if thresholds and rates:
        decision = ("<h2>Decision at threshold</h2>"
                    f"<p class=info>set by {escape(str(thresholds.get('source', 'n/a')))}, target false-positive rate "
                    f"{percent(thresholds.get('target_fpr'))}; a score or map value above the threshold is a defect</p>"
                    + _table(["level", "threshold", "false-positive rate", "recall"],
                             [[lvl, _num(thresholds.get(lvl)), percent(rates.get(f"{lvl}_fpr")), percent(rates.get(f"{lvl}_recall"))]
                              for lvl in ("image", "pixel")]
                             + ([["region", _num(thresholds.get("region")), percent(rates.get("region_false_alarm_rate")),
                                  percent(rates.get("region_recall"))]] if "region_recall" in rates else []))
                    + _regions_html(rates))
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>cflow-ad report: {escape(res.name)}</title>
<style>{CSS}</style></head><body>
<h1>cflow-ad test report: {escape(res.name)}</h1>
<p class=info>{" · ".join(info)}</p>{config_html}
<h2>Metrics</h2>
{_table(["image AUROC", "pixel AUROC", f"AUPRO (FPR ≤ {FPR_LIMIT})"],
        [[percent(metrics.get("image_auroc")), percent(metrics.get("pixel_auroc")), percent(metrics.get("aupro"))]])}
{coverage}
<h3>Per defect type (against all good images)</h3>
{per_type}
{decision}
<h2>Curves</h2>
<img src="{_curves_figure(curves, metrics)}" alt="ROC and PRO curves">
<h2>Score distribution</h2>
<img src="{_histogram_figure(scores, (thresholds or {}).get("image"), scale)}" alt="histogram of image scores">
<h2>Worst false positives</h2>
{legend}
<p class=info>The highest-scored good images: what the model takes for defects.</p>
{_cases_html(res, cases, "false positive")}
<h2>Worst false negatives</h2>
<p class=info>The lowest-scored defect images, ground-truth outline in green.</p>
{_cases_html(res, cases, "false negative")}
</body></html>
"""
    return write_text(path, page)
