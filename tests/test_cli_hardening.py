"""Hostile input to the CLI: every numeric option, index names, --overwrite, symlinks, interrupted runs, manifests.

Each bad input must give one `error:` line and exit status 2, with no traceback, and leave every other index and
file as it was. The table-driven test walks the real parsers, so options added later are covered too.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from leafkd.cli import build_parser, main
from leafkd.cli.options import FLOAT_MAX, INT_MAX, NumberType, Parser

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
ENV.pop("LEAFKD_API_KEY", None)

# Commands whose parsers other modules own and that do not use the range layer yet: their plain int/float options
# are expected failures until they do (then they are checked like every other option, with no change here).
NOT_YET_RANGED = {"train", "train-embedder", "eval", "demo"}


def cli(*args: str, cwd: Path | None = None, env: dict | None = None, timeout: int = 300):
    """Run `python -m leafkd ARGS` (or `train-embedder`) as a real process."""
    if args and args[0] == "train-embedder":
        cmd = [sys.executable, "-c", "import sys; from leafkd.cli import train_embedder_main as m; sys.exit(m())",
               *args[1:]]
    else:
        cmd = [sys.executable, "-m", "leafkd", *args]
    return subprocess.run(cmd, cwd=cwd, env=env or ENV, capture_output=True, text=True, timeout=timeout)


class Ran:
    """The outcome of a command run in this process (`main`, the same code path as the `leafkd` executable)."""

    def __init__(self, capsys, *args: str) -> None:
        try:
            self.returncode = main(list(args))
        except SystemExit as e:  # parse errors and --help
            self.returncode = e.code
        out = capsys.readouterr()
        self.stdout, self.stderr = out.out, out.err


def one_error(r, needle: str = "") -> str:
    """Assert a command failed as a user error should: exit 2, exactly one `error:` line, no traceback."""
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    errors = [x for x in lines if x.startswith("error: ")]
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    assert len(errors) == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert needle in errors[0], errors[0]
    return errors[0]


# -- the table: every numeric option of every command, fed a negative, zero, huge and non-finite value

def _commands() -> list[tuple[list[str], argparse.ArgumentParser]]:
    out: list[tuple[list[str], argparse.ArgumentParser]] = []

    def walk(path: list[str], parser: argparse.ArgumentParser) -> None:
        out.append((path, parser))
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    walk([*path, name], sub)

    walk([], build_parser())
    from leafkd.cli.train import build_train_parser

    out.append((["train-embedder"], build_train_parser(Parser(prog="train-embedder"))))
    return out


def _numeric_options() -> list[tuple[str, str, object]]:
    cases = []
    for path, parser in _commands():
        for action in parser._actions:
            if action.option_strings and action.type in (int, float) or isinstance(action.type, NumberType):
                cases.append((" ".join(path), action.option_strings[-1], action.type))
    return cases


NUMERIC = _numeric_options()
VALUES = ["-5", "0", str(10**30), "nan", "inf"]


def _expect_rejected(typ, value: str) -> bool:
    if isinstance(typ, NumberType):
        try:
            x = float(value) if typ.kind is float else int(value)
        except ValueError:
            return True
        if typ.kind is float and not np.isfinite(x):
            return True
        return typ.range.problem(x) is not None or abs(x) > (INT_MAX if typ.kind is int else FLOAT_MAX)
    raise AssertionError("not a ranged option")


def test_the_table_covers_the_commands():
    commands = {c for c, _, _ in NUMERIC}
    assert {"serve", "capture", "adapt-text", "train", "train-embedder", "eval"} <= commands
    assert len(NUMERIC) >= 20


@pytest.mark.parametrize("command,flag,typ", NUMERIC, ids=[f"{c}:{f}" for c, f, _ in NUMERIC])
def test_every_numeric_option_refuses_bad_values(command, flag, typ, capsys):
    if not isinstance(typ, NumberType):
        if command.split()[0] in NOT_YET_RANGED:
            pytest.xfail(f"{command} {flag}: a plain {typ.__name__}, not on leafkd.cli.options' range layer yet")
        pytest.fail(f"{command} {flag}: numeric options must declare a range (leafkd.cli.options.number)")
    for value in VALUES:
        argv = command.split() + [f"{flag}={value}"]
        with pytest.raises(SystemExit) as exit_info:
            if command == "train-embedder":
                from leafkd.cli import train_embedder_main

                train_embedder_main(argv[1:])
            else:
                main(argv)
        err = [x for x in capsys.readouterr().err.splitlines() if x.strip()]
        mentions = [x for x in err if f"argument {flag}" in x]
        if _expect_rejected(typ, value):
            assert exit_info.value.code == 2 and len(err) == 1 and err[0].startswith("error: "), (value, err)
            assert mentions, (value, err)
        else:  # in range: parsing goes on (and stops at the next problem, a missing required option or none)
            assert not mentions, (value, err)


def test_parse_errors_are_one_line(capsys):
    one_error(cli("serve", "--index", "k", "--port", "70000"), "--port")  # a real process
    one_error(cli("train-embedder", "--epochs", "abc"), "--epochs")
    one_error(Ran(capsys, "serve", "--index", "k", "--max-query-chars", "-1"), "--max-query-chars")
    one_error(Ran(capsys, "capture", "--data", "x", "--out", "o", "--shard-size", "0"), "--shard-size")
    one_error(Ran(capsys, "index", "build", "--name", "x", "--corpus", "c"), "--teacher")
    one_error(Ran(capsys, "no-such-command"), "invalid choice")
    from leafkd.cli import train_embedder_main

    with pytest.raises(SystemExit):
        train_embedder_main(["--no-such-option"])
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: unrecognized arguments: --no-such-option"), err


# -- index names, --overwrite and symlinks

BUILD = ["index", "build", "--corpus", "c.jsonl", "--vectors", "v.npy", "--quiet", "--no-gpu"]


@pytest.fixture()
def workspace(tmp_path, monkeypatch, capsys):
    """Two indexes (built from precomputed vectors) and a few innocent bystanders; the current folder."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"_id": f"d{i}", "text": f"document number {i}"}) + "\n"
                                              for i in range(6)))
    np.save(tmp_path / "v.npy", np.random.default_rng(0).standard_normal((6, 8)).astype(np.float32))
    for name in ("one", "two"):
        r = Ran(capsys, *BUILD, "--name", name)
        assert r.returncode == 0, r.stderr
    (tmp_path / "keep").mkdir()
    (tmp_path / "keep" / "precious.txt").write_text("do not delete")
    (tmp_path / "indexes" / "notes").mkdir()
    (tmp_path / "indexes" / "notes" / "todo.txt").write_text("not an index")
    return tmp_path


def snapshot(root: Path) -> dict[str, str]:
    """Every file under ``root`` (symlinks as their target) and its sha256."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        if p.is_symlink():
            out[rel] = "-> " + os.readlink(p)
        elif p.is_file() and not p.name.endswith(".lock"):
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def test_an_empty_name_deletes_nothing(workspace):
    """The data-loss reproduction, as a real process: `--name ''` used to replace the whole indexes folder."""
    before = snapshot(workspace)
    one_error(cli(*BUILD, "--name", "", "--overwrite", cwd=workspace), "index name ''")
    assert snapshot(workspace) == before


@pytest.mark.parametrize("name", [".", "..", "../x", "a/b", "/tmp", "KEEP_ABS", ".hidden", "x" * 200, "a b", "-x"])
def test_index_names_are_plain_names(workspace, capsys, name):
    if name == "KEEP_ABS":
        name = str(workspace / "keep")
    before = snapshot(workspace)
    for command in (BUILD + ["--overwrite"], ["index", "info"], ["index", "delete", "--ids", "d1"]):
        one_error(Ran(capsys, *command, f"--name={name}"), "index name")
    assert snapshot(workspace) == before


def test_overwrite_replaces_only_leafkd_indexes(workspace, capsys):
    before = snapshot(workspace)
    one_error(Ran(capsys, *BUILD, "--name", "notes", "--overwrite"), "not a readable leafkd index")
    one_error(Ran(capsys, *BUILD, "--name", "one"), "already exists")
    (workspace / "indexes" / "file").write_text("a file")
    one_error(Ran(capsys, *BUILD, "--name", "file", "--overwrite"), "not a folder")
    (workspace / "indexes" / "file").unlink()
    assert snapshot(workspace) == before
    r = Ran(capsys, *BUILD, "--name", "one", "--overwrite")
    assert r.returncode == 0, r.stderr
    assert Ran(capsys, "index", "info", "--name", "two", "--verify").returncode == 0


def test_symlinked_index_is_refused_and_blocks_nothing(workspace, capsys):
    link = workspace / "indexes" / "lnk"
    link.symlink_to(workspace / "indexes" / "two")
    before = snapshot(workspace)
    one_error(Ran(capsys, *BUILD, "--name", "lnk", "--overwrite"), "symbolic link")
    one_error(Ran(capsys, *BUILD, "--name", "lnk"), "symbolic link")
    assert snapshot(workspace) == before
    assert not [p.name for p in (workspace / "indexes").iterdir() if p.name.startswith(".lnk.") and
                not p.name.endswith(".lock")]
    assert Ran(capsys, *BUILD, "--name", "three").returncode == 0  # later builds work


def test_indexes_dir_and_vectors_that_are_wrong(workspace, capsys):
    one_error(Ran(capsys, *BUILD, "--name", "z", "--indexes-dir", "c.jsonl"), "not a folder")
    one_error(Ran(capsys, "index", "info", "--name", "one", "--indexes-dir", "c.jsonl/x"), "not a folder")
    build_z = ["index", "build", "--corpus", "c.jsonl", "--name", "z", "--vectors"]
    one_error(Ran(capsys, *build_z, "c.jsonl"), ".npy")
    (workspace / "bad.npy").write_bytes(b"not numpy at all")
    one_error(Ran(capsys, *build_z, "bad.npy"), "not a readable .npy")
    np.save(workspace / "words.npy", np.array(["a", "b"]))
    one_error(Ran(capsys, *build_z, "words.npy"), "2-d numeric")


# -- search parameters and manifests

def test_search_params_checked_at_build_and_at_load(workspace, capsys):
    for param, needle in [("nprobe=-5", "nprobe"), ("nprobe=0", "nprobe"), ("nprobe=2.5", "integer"),
                          ("nprobe=nan", "finite"), ("efSearch=-1", "efSearch"), ("bogus=3", "no such knob")]:
        one_error(Ran(capsys, *BUILD, "--name", "z", "--param", param), needle)
    assert not (workspace / "indexes" / "z").exists()
    manifest = workspace / "indexes" / "one" / "manifest.json"
    m = json.loads(manifest.read_text())
    m["search_params"] = {"nprobe": -5}
    manifest.write_text(json.dumps(m))
    from leafkd.errors import LeafkdError
    from leafkd.retrieval.index import load_index

    with pytest.raises(LeafkdError, match="nprobe"):
        load_index(workspace / "indexes" / "one")


@pytest.mark.parametrize("key,value", [("dim", "abc"), ("dim", 0), ("generation", "1"), ("labels", "rows"),
                                       ("files", {"index": "../../etc/passwd", "docs": "docs.1.jsonl"}),
                                       ("checksums", ["x"]), ("search_params", {"nprobe": "8"}),
                                       ("count", -1), ("fp16", "yes")])
def test_manifest_with_wrong_types_is_one_error(workspace, capsys, key, value):
    manifest = workspace / "indexes" / "one" / "manifest.json"
    m = json.loads(manifest.read_text())
    m[key] = value
    manifest.write_text(json.dumps(m))
    one_error(Ran(capsys, "index", "info", "--name", "one", "--verify"), key)


# -- interrupted runs and dropped documents

def test_leftovers_of_killed_runs_are_cleaned_on_the_next_run(workspace, capsys):
    ix = workspace / "indexes"
    (ix / ".one.k3j4h5g6.tmp").mkdir()  # a build killed while writing its temporary folder
    (ix / ".one.k3j4h5g6.tmp" / "index.1.faiss").write_bytes(b"partial")
    (ix / "one" / ".index.2.faiss.abcd_123.tmp").write_bytes(b"partial")  # an add killed mid-write
    (ix / "one" / ".keys.2.npy.zz99zz99.tmp.npy").write_bytes(b"partial")
    (ix / ".two.q1w2e3r4.tmp").mkdir()  # another index's leftovers are not touched by a run on "one"
    r = Ran(capsys, "index", "delete", "--name", "one", "--ids", "d1")
    assert r.returncode == 0, r.stderr
    assert not (ix / ".one.k3j4h5g6.tmp").exists()
    assert sorted(p.name for p in (ix / "one").iterdir() if p.name.startswith(".")) == []
    assert (ix / ".two.q1w2e3r4.tmp").exists()


def test_a_swap_killed_between_its_renames_is_repaired(workspace, capsys):
    ix = workspace / "indexes"
    os.replace(ix / "one", ix / ".one.old")  # killed after parking the old index, before the new one moved in
    assert Ran(capsys, "index", "delete", "--name", "one", "--ids", "d2").returncode == 0
    assert not (ix / ".one.old").exists()
    assert Ran(capsys, "index", "info", "--name", "one", "--verify").returncode == 0
    shutil.copytree(ix / "one", ix / ".one.old")  # killed after the swap, before the parked copy was removed
    assert Ran(capsys, "index", "delete", "--name", "one", "--ids", "d3").returncode == 0
    assert not (ix / ".one.old").exists()


def test_empty_documents_are_reported_by_id(tmp_path, monkeypatch, capsys):
    import retrieval_support as S

    (tmp_path / "c.jsonl").write_text('{"_id": "a", "text": "supersonic flow"}\n{"_id": "b", "text": " "}\n')
    monkeypatch.chdir(tmp_path)
    r = Ran(capsys, "index", "build", "--teacher", str(S.teacher_dir()), "--corpus", "c.jsonl", "--name", "ix",
            "--quiet", "--no-gpu", "--device", "cpu")
    assert r.returncode == 0 and "empty document(s) skipped" in r.stderr and ": b" in r.stderr, r.stderr
    (tmp_path / "more.jsonl").write_text('{"_id": "c", "text": "heat transfer"}\n{"_id": "d", "title": "", '
                                         '"text": "\\t"}\n{"text": ""}\n')
    r = Ran(capsys, "index", "add", "--name", "ix", "--corpus", "more.jsonl", "--quiet", "--device", "cpu")
    assert r.returncode == 0, r.stderr
    note = [x for x in r.stderr.splitlines() if "empty document" in x]
    assert len(note) == 1 and "2 empty" in note[0] and "d" in note[0] and "line 3" in note[0], r.stderr
    assert "2 documents" in r.stdout


# -- other paths

def test_output_folders_that_are_files_or_links(tmp_path, capsys):
    (tmp_path / "f").write_text("x")
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    one_error(Ran(capsys, "capture", "--data", "x.txt", "--out", str(tmp_path / "f")), "not a folder")
    one_error(Ran(capsys, "capture", "--data", "x.txt", "--out", str(tmp_path / "f" / "sub")), "not a folder")
    one_error(Ran(capsys, "adapt-text", "x.txt", "--out", str(tmp_path / "link")), "symbolic link")
    one_error(Ran(capsys, "export", "--student", "s", "--out", str(tmp_path / "f")), "not a folder")
    assert (tmp_path / "f").read_text() == "x" and list((tmp_path / "real").iterdir()) == []
