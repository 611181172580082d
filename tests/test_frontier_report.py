"""eval/frontier.py's corpus-adapted half: scores of `leafkd distill` summaries joined into the frontier table."""

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "eval" / "frontier.py"


def summary(folder: Path, corpus: str, teacher: float, student: float, asymmetric: float) -> Path:
    folder.mkdir(parents=True)
    (folder / "summary.json").write_text(json.dumps({
        "scores": {"teacher": teacher, "student": student, "asymmetric": asymmetric},
        "config": {"corpus": f"/data/{corpus}", "seed": 0},
        "student_metrics": {"final": {"heldout_cos_mean": 0.8}}, "seconds": {"total": 10.0}}))
    return folder / "summary.json"


def test_adapted_half_averages_per_corpus_ratios_and_marks_partial_rows(tmp_path):
    a = summary(tmp_path / "a", "scifact", 0.60, 0.54, 0.60)
    b = summary(tmp_path / "b", "npl", 0.40, 0.40, 0.38)
    c = summary(tmp_path / "c", "npl", 0.40, 0.30, 0.40)
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, str(SCRIPT), "--adapted", "--out", str(out), f"small={a}", f"small={b}",
                           f"tiny={c.parent}"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    rows = {r["name"]: r for r in json.loads((out / "frontier-adapted.json").read_text())["rows"]}
    assert rows["small"]["asymmetric_pct_teacher"] == 97.5  # mean of 100% and 95%
    assert rows["small"]["student_pct_teacher"] == 95.0  # mean of 90% and 100%
    assert [r["corpus"] for r in rows["small"]["corpora"]] == ["scifact", "npl"]
    table = (out / "frontier.md").read_text()
    assert "| tiny |" in table and "100.00 (npl only)" in table and "75.00 (npl only)" in table


def test_adapted_half_refuses_a_run_without_scores(tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "summary.json").write_text(json.dumps({"scores": {}, "config": {}}))
    done = subprocess.run([sys.executable, str(SCRIPT), "--adapted", "--out", str(tmp_path / "out"),
                           f"x={folder}"], capture_output=True, text=True)
    assert done.returncode != 0
    message = f"error: {folder / 'summary.json'}: no evaluation scores (a run with --no-eval?)"
    assert done.stderr.strip().splitlines() == [message]


def test_a_half_without_runs_is_an_error_and_keeps_the_recorded_file(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "frontier-adapted.json").write_text('{"rows": [{"name": "kept"}]}')
    for half in ("--adapted", "--quality"):
        done = subprocess.run([sys.executable, str(SCRIPT), half, "--out", str(out)], capture_output=True, text=True)
        assert done.returncode != 0
        assert done.stderr.strip().splitlines() == [f"error: {half} needs NAME=PATH arguments"]
    assert (out / "frontier-adapted.json").read_text() == '{"rows": [{"name": "kept"}]}'
