"""report.html: one self-contained page a person reads after a build. Plots are PNGs embedded as data URIs, so the
file can be archived, mailed or opened from a CI artifact with nothing beside it.

It shows the budget and whether it was met, latency per measured round, per-layer widths before and after, quality
against latency for the measured candidates, the layers kept whole, the versions and the manifest.
"""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display: render to memory
import matplotlib.pyplot as plt  # noqa: E402


def write_html(path: Path, report: dict, widths: dict[str, tuple[int, int]], files: dict) -> None:
    """Write the page for ``report``; ``widths`` maps each group root to (original, kept) channels, ``files`` each
    output file to its sha256 and size (the manifest's entries)."""
    budget = report["budget"]
    met = report["met_budget"]
    estimate = " (estimate)" if report["measured_on"] == "estimate" else ""
    quality = report.get("quality") or {}
    rows = [
        ("target", f"{report['target']} ({report['backend']}, {report['precision']})"),
        (
            "budget",
            f"{budget['kind']} = {budget['value']:g}"
            + (f" → {budget['latency_ms']:.3f} ms p50" if budget["latency_ms"] is not None else ""),
        ),
        ("measured on", report["measured_on"]),
        (
            "latency p50",
            f"{report['baseline']['latency_ms']['p50']:.3f} → {report['result']['comparable_p50']:.3f}"
            f" ms{estimate}{_aside(report)}",
        ),  # fmt: skip
        ("speedup", f"{report['result']['speedup']:.2f}x{estimate}"),
        ("MACs", f"{report['baseline']['macs'] / 1e6:.1f} M → {report['result']['macs'] / 1e6:.1f} M"),
        ("params", f"{report['baseline']['params'] / 1e6:.2f} M → {report['result']['params'] / 1e6:.2f} M"),
        (
            "outputs vs PyTorch",
            f"max abs error {report['validation']['max_abs_err']:.2g} (tolerance {report['validation']['atol']:.2g})",
        ),  # fmt: skip
        (
            "quality",
            f"{quality.get('metric', '-')}: {quality.get('baseline', float('nan')):.3f} →"
            f" {quality.get('result', float('nan')):.3f} ({quality.get('evaluated_on', '')})",
        ),  # fmt: skip
        ("method", report["method"]),
    ]
    verdict = "met" if met else "NOT met"
    parts = [
        f"<h1>edgeprune build: {html.escape(report['target'])}</h1>",
        f"<p class='{'ok' if met else 'bad'}'>Budget {verdict}{' (by the estimate)' if estimate else ''}.</p>",
        *(
            f"<p class='bad'>{html.escape(report[key])}.</p>"
            for key in ("not_measured", "host_measurement")
            if report.get(key)
        ),
        _table(rows),
        "<h2>Latency per measured round</h2>",
        _img(_rounds_plot(report)),
        "<h2>Quality against latency</h2>",
        _img(_tradeoff_plot(report)),
        "<h2>Channel widths before and after</h2>",
        _img(_widths_plot(widths)),
    ]
    if (report.get("depth") or {}).get("residual_blocks"):  # in the order chosen, with the outputs' distance after each
        depth = report["depth"]
        removed = zip(depth["dropped"], depth["distance_after_each"], strict=True)
        parts += [f"<h2>Residual blocks removed ({len(depth['dropped'])} of {len(depth['residual_blocks'])})</h2>",
                  _table([(name, f"outputs' distance after it {d:.4f}") for name, d in removed])]  # fmt: skip
        if depth.get("auto_judged"):  # --drop-blocks auto: how many, chosen by each count's plan to the budget
            judged = [(f"{j['blocks']} blocks", "channels cannot reach the budget" if j["distance"] is None
                       else f"outputs' distance {j['distance']:.4f}") for j in depth["auto_judged"]]  # fmt: skip
            parts += [f"<h3>How many: each count's plan to {depth['auto_goal_ms']:.3f} ms, judged on the task</h3>",
                      _table(judged)]  # fmt: skip
        elif (report.get("vote") or {}).get("blocks") is not None:  # vote: the bank's, not judged here
            parts += ["<h3>Which: those at least half of the nearest earlier tasks in the bank removed</h3>"]
    if report.get("unprunable"):
        parts += ["<h2>Layers kept whole</h2>", _table([(u["module"], u["reason"]) for u in report["unprunable"]])]
    listed = [(name, f"{entry['sha256']} ({entry['bytes']} bytes)") for name, entry in sorted(files.items())]
    parts += ["<h2>Versions</h2>", _table(sorted(report["versions"].items())), "<h2>Manifest</h2>", _table(listed)]
    title = f"edgeprune {html.escape(report['target'])}"
    page = (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{title}</title><style>{_STYLE}</style></head>"
        f"<body>{''.join(parts)}</body></html>\n"
    )
    path.write_text(page)


_STYLE = (
    "body{font-family:sans-serif;max-width:960px;margin:2em auto;color:#222}table{border-collapse:collapse}"
    "td{border:1px solid #ccc;padding:3px 8px;font-size:13px}.ok{color:#176c2c;font-weight:bold}"
    ".bad{color:#a31515;font-weight:bold}img{max-width:100%}"
)


def _aside(report: dict) -> str:
    """How the pruned p50 was obtained, when it was timed beside the unpruned model rather than alone."""
    latency = report["result"]["latency_ms"]
    if not latency.get("reference_p50"):
        return ""
    return (f" (in the baseline's conditions; measured {latency['p50']:.3f} ms beside the unpruned model at"
            f" {latency['reference_p50']:.3f} ms)")  # fmt: skip


def _table(rows) -> str:
    cells = "".join(f"<tr><td>{html.escape(str(a))}</td><td>{html.escape(str(b))}</td></tr>" for a, b in rows)
    return f"<table>{cells}</table>"


def _img(figure) -> str:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
    plt.close(figure)
    return f"<img alt='plot' src='data:image/png;base64,{base64.b64encode(buffer.getvalue()).decode()}'>"


def _rounds_plot(report: dict):
    figure, axes = plt.subplots(figsize=(7, 3))
    rounds = report["iterations"]
    steps = [r["step"] for r in rounds]
    axes.bar(steps, [r["comparable_p50"] for r in rounds], color="#4a7ab5", label="candidate p50")
    if report["budget"]["latency_ms"] is not None:
        axes.axhline(report["budget"]["latency_ms"], color="#a31515", linestyle="--", label="budget")
    axes.axhline(report["baseline"]["latency_ms"]["p50"], color="#888", linestyle=":", label="unpruned")
    for r in rounds:
        axes.annotate(f"ratio {r['ratio']:.2f}", (r["step"], r["comparable_p50"]), ha="center", va="bottom", fontsize=8)
    axes.set_xlabel("round")
    axes.set_ylabel("p50 (ms)")
    axes.set_xticks(steps)
    axes.legend(fontsize=8, loc="lower right")
    return figure


def _tradeoff_plot(report: dict):
    figure, axes = plt.subplots(figsize=(7, 3))
    quality = report.get("quality") or {}
    points = [(r["comparable_p50"], r["quality"]) for r in report["iterations"] if r.get("quality") is not None]
    if points:
        axes.scatter(*zip(*points, strict=True), color="#4a7ab5", label="candidates (before recovery)")
    axes.scatter([report["baseline"]["latency_ms"]["p50"]], [quality.get("baseline", 1.0)], color="#888",
                 label="unpruned")  # fmt: skip
    axes.scatter([report["result"]["comparable_p50"]], [quality.get("result", float("nan"))], color="#176c2c",
                 marker="*", s=150, label="shipped")  # fmt: skip
    if report["budget"]["latency_ms"] is not None:
        axes.axvline(report["budget"]["latency_ms"], color="#a31515", linestyle="--", label="budget")
    axes.set_xlabel("p50 (ms)")
    axes.set_ylabel(quality.get("metric", "quality"))
    axes.legend(fontsize=8)
    return figure


def _widths_plot(widths: dict[str, tuple[int, int]]):
    names = list(widths)
    figure, axes = plt.subplots(figsize=(7, max(2.5, 0.22 * len(names))))
    positions = range(len(names))
    axes.barh(positions, [widths[n][0] for n in names], color="#ccc", label="before")
    axes.barh(positions, [widths[n][1] for n in names], color="#4a7ab5", label="after")
    axes.set_yticks(list(positions))
    axes.set_yticklabels(names, fontsize=7)
    axes.invert_yaxis()
    axes.set_xlabel("channels")
    axes.legend(fontsize=8)
    return figure
