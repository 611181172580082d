"""Evaluation reports: ``results.json``, a markdown table (``results.md``) and PNG charts, written atomically."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from leafkd.atomic import write_bytes, write_json, write_text


def _pct(x: float | None) -> str:
    return "" if x is None else f"{100 * x:.2f}"


def _short(sha: str | None) -> str:
    return (sha or "unknown")[:10]


def markdown_table(results: dict[str, Any]) -> str:
    """Rows: modes; columns: tasks (main metric x100) and their average."""
    names = [t["name"] for t in results["tasks"]]
    head = "| mode | " + " | ".join(names) + " | average |"
    sep = "|---|" + "---:|" * (len(names) + 1)
    lines = [head, sep]
    for row in results["rows"]:
        cells = [_pct(row["scores"].get(n)) for n in names]
        lines.append(f"| {row['mode']} | " + " | ".join(cells) + f" | {_pct(row['average'])} |")
    return "\n".join(lines) + "\n"


def markdown_report(results: dict[str, Any]) -> str:
    """The whole markdown report: provenance, the score table, encoders per mode, alignment diagnostics."""
    models = results.get("models", {})
    commit = results.get("commit") or {}
    out = ["# leafkd evaluation", ""]
    for who in ("teacher", "student", "base"):
        if who in models:
            m = models[who]
            fp = f" (fingerprint {m['fingerprint'][:12]})" if m.get("fingerprint") else ""
            out.append(f"- {who}: `{m['path']}`{fp}")
    out.append(f"- data: `{results['data_dir']}`")
    dirty = " + uncommitted changes" if commit.get("dirty") else ""
    out.append(f"- commit: `{_short(commit.get('sha'))}`{dirty}")
    v = results.get("versions", {})
    engine = results["engine"] + (f" (mteb {v.get('mteb')})" if results["engine"] == "mteb" else " (built-in)")
    out.append(f"- engine: {engine}; device {results.get('device')}; {results.get('created')}")
    metrics = ", ".join(f"{t['name']}: {t['metric']}" for t in results["tasks"])
    out += [f"- metrics (x100): {metrics}", ""]
    out.append(markdown_table(results))
    out += ["| mode | query encoder | document encoder |", "|---|---|---|"]
    for row in results["rows"]:
        enc = row.get("encoders", {})
        out.append(f"| {row['mode']} | `{enc.get('query')}` | `{enc.get('document')}` |")
    if results.get("ridge"):
        r = results["ridge"]
        out += ["", f"Ridge map: alpha {r['alpha']}, fitted on {r['texts']} texts from `{r['source']}` "
                    f"(train R^2 {r['fit_r2']:.3f})."]
    align = results.get("alignment")
    if align:
        out += ["", "## Alignment (held-out: evaluation texts)", "",
                "| task | texts | cos mean | cos p5 | top-10 agreement |", "|---|---|---:|---:|---:|"]
        for task, a in align.items():
            for part, c in a["cosine"].items():
                agree = a.get("top10_agreement", {}).get("asymmetric") if part != "documents" else None
                out.append(f"| {task} | {part} ({c['n']}) | {c['mean']:.4f} | {c['p5']:.4f} | "
                           f"{'' if agree is None else f'{agree:.3f}'} |")
        retrieval = {t: a for t, a in align.items() if "truncation" in a}
        if retrieval:
            dims = sorted({int(d) for a in retrieval.values() for d in a["truncation"]["asymmetric"]}, reverse=True)
            out += ["", "Matryoshka truncation, nDCG@10 x100 (asymmetric / teacher):", "",
                    "| task | " + " | ".join(str(d) for d in dims) + " |", "|---|" + "---:|" * len(dims)]
            for task, a in retrieval.items():
                tr = a["truncation"]
                cells = [f"{_pct(tr['asymmetric'].get(str(d)))} / {_pct(tr['teacher'].get(str(d)))}" for d in dims]
                out.append(f"| {task} | " + " | ".join(cells) + " |")
            kinds = list(next(iter(retrieval.values()))["quantization"]["asymmetric"])
            out += ["", "Quantisation (both sides; `binary_float_query`: binary documents, float queries), "
                        "nDCG@10 x100 (asymmetric / teacher):", "",
                    "| task | " + " | ".join(kinds) + " |", "|---|" + "---:|" * len(kinds)]
            for task, a in retrieval.items():
                q = a["quantization"]
                cells = [f"{_pct(q['asymmetric'][k])} / {_pct(q['teacher'][k])}" for k in kinds]
                out.append(f"| {task} | " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return buf.getvalue()


def scores_chart(results: dict[str, Any]) -> bytes:
    """Grouped bars: one group per task (and the average), one bar per mode."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    names = [t["name"] for t in results["tasks"]] + ["average"]
    rows = results["rows"]
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(names)), 4))
    width = 0.8 / max(len(rows), 1)
    x = np.arange(len(names))
    for i, row in enumerate(rows):
        vals = [100 * row["scores"][n] for n in names[:-1]] + [100 * row["average"]]
        ax.bar(x + (i - (len(rows) - 1) / 2) * width, vals, width, label=row["mode"])
    ax.set_xticks(x, names)
    ax.set_ylabel("score x100 (nDCG@10 / Spearman)")
    teacher = Path(results["models"].get("teacher", {}).get("path", "") or "").name
    student = Path(results["models"].get("student", {}).get("path", "") or "").name
    ax.set_title(f"teacher {teacher or '-'}, student {student or '-'}")
    ax.legend(fontsize=8, ncols=min(len(rows), 5), loc="lower center", bbox_to_anchor=(0.5, 1.08))
    ax.grid(axis="y", alpha=0.3)
    return _png(fig)


def alignment_chart(results: dict[str, Any]) -> bytes | None:
    """Left: asymmetric nDCG@10 against kept dimensions; right: by quantisation."""
    align = {t: a for t, a in (results.get("alignment") or {}).items() if "truncation" in a}
    if not align:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for task, a in align.items():
        tr = a["truncation"]
        dims = sorted(int(d) for d in tr["asymmetric"])
        line = left.plot(dims, [100 * tr["asymmetric"][str(d)] for d in dims], marker="o", label=f"{task} asymmetric")
        left.plot(dims, [100 * tr["teacher"][str(d)] for d in dims], marker="x", linestyle="--",
                  color=line[0].get_color(), label=f"{task} teacher")
    left.set_xscale("log", base=2)
    left.set_xlabel("dimensions kept (Matryoshka truncation)")
    left.set_ylabel("nDCG@10 x100")
    left.legend(fontsize=7)
    left.grid(alpha=0.3)
    kinds = list(next(iter(align.values()))["quantization"]["asymmetric"])
    x = np.arange(len(kinds))
    width = 0.8 / len(align)
    for i, (task, a) in enumerate(align.items()):
        right.bar(x + (i - (len(align) - 1) / 2) * width, [100 * a["quantization"]["asymmetric"][k] for k in kinds],
                  width, label=task)
    right.set_xticks(x, kinds, fontsize=8)
    right.set_ylabel("asymmetric nDCG@10 x100")
    right.legend(fontsize=7)
    right.grid(axis="y", alpha=0.3)
    return _png(fig)


def write_report(results: dict[str, Any], out_dir: str | Path) -> dict[str, Path]:
    """Write results.json, results.md, scores.png (and alignment.png) under `out_dir`; returns their paths."""
    out = Path(out_dir)
    paths = {"json": out / "results.json", "markdown": out / "results.md", "scores_png": out / "scores.png"}
    write_json(paths["json"], results)
    write_text(paths["markdown"], markdown_report(results))
    write_bytes(paths["scores_png"], scores_chart(results))
    png = alignment_chart(results)
    if png is not None:
        paths["alignment_png"] = out / "alignment.png"
        write_bytes(paths["alignment_png"], png)
    return paths


