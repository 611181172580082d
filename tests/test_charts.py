"""eval/charts.py: the charts of eval/RESULTS.md are drawn from the recorded results files."""

from __future__ import annotations

import importlib.util
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_results_charts_draw_from_the_recorded_files(tmp_path):
    """eval/charts.py reads every recorded flagship result it charts (a renamed folder or recipe fails here)."""
    spec = importlib.util.spec_from_file_location("charts", REPO / "eval" / "charts.py")
    charts = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(charts)
    rows = dict(charts.recipe_rows())
    assert [len(runs) for runs in rows.values()] == [3, 3, 1, 3, 4, 5]  # seeds per recipe, as RESULTS.md reports
    assert round(sum(r["asym_pct"] for r in rows["generic + package docs"]) / 3, 2) == 87.62
    assert round(sum(r["asym_pct"] for r in rows["+ bank loss on the docs (w 300)"]) / 5, 2) == 99.72
    charts.main(["--out", str(tmp_path)])
    assert (tmp_path / "recipes.png").stat().st_size > 10_000 and (tmp_path / "curves.png").stat().st_size > 10_000
