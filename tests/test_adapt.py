"""Corpus-adaptation text: sentence pieces and seeded random spans of an index's documents."""

from __future__ import annotations

import shlex

from leafkd.cli import main
from leafkd.data.adaptation import adaptation_text, random_spans, split_pieces
from leafkd.data.beir import read_beir
from leafkd.data.documents import join_title
from leafkd.data.sources import load_corpus


def test_split_pieces_sentences_windows_and_short_ones():
    assert split_pieces("Heat flows from hot to cold. Why does it flow? Because of entropy, mostly! Yes it does.") == [
        "Heat flows from hot to cold.", "Why does it flow?", "Because of entropy, mostly!"]  # 3 words: dropped
    unpunctuated = " ".join(f"w{i}" for i in range(45))  # no sentence end in 45 words: 20-word windows
    assert split_pieces(unpunctuated) == [" ".join(f"w{i}" for i in range(a, min(a + 20, 45))) for a in (0, 20, 40)]
    assert split_pieces("too short") == []


def test_random_spans_are_seeded_contiguous_and_sized():
    docs = [" ".join(f"d{j}w{i}" for i in range(n)) for j, n in enumerate((3, 10, 60))]
    spans = random_spans(docs, 5, seed=7)
    assert spans == random_spans(docs, 5, seed=7) and spans != random_spans(docs, 5, seed=8)
    for span in spans:
        words = span.split()
        assert 4 <= len(words) <= 32 and not words[0].startswith("d0")  # the 3-word document is skipped
        doc = docs[int(words[0][1])]
        assert f" {span} " in f" {doc} "  # a contiguous run of the document's words


def test_adapt_text_command_on_cranfield(tmp_path, data_dir, capsys):
    source = data_dir / "classic" / "cranfield"
    assert main(["adapt-text", str(source), "--out", str(tmp_path / "a"), "--spans", "2"]) == 0
    out = capsys.readouterr().out
    pieces = (tmp_path / "a" / "cranfield-pieces.txt").read_text().splitlines()
    spans = (tmp_path / "a" / "cranfield-spans.txt").read_text().splitlines()
    assert (pieces, spans) == tuple(map(list, adaptation_text(source, 2, seed="0:cranfield")))
    docs = [f" {join_title(d['title'], d['text'])} " for d in read_beir(source).corpus.values()]
    assert len(spans) > 2000 and all(any(f" {s} " in d for d in docs) for s in spans[:200])
    assert len(pieces) > 5000 and all(len(p.split()) >= 4 for p in pieces)
    # The printed --data sources load as they are, with the suggested weights.
    lines = out.splitlines()
    data = [a for a in shlex.split(lines[-3]) if a != "--data"]
    corpus = load_corpus(data)
    weight = dict(zip(corpus.texts, corpus.weights))
    assert len(corpus) >= len(set(pieces) | set(spans)) and all(weight[p] >= 3 for p in pieces)
    assert weight[next(s for s in spans if s not in set(pieces) and f" {s} " not in docs)] == 1
    # The printed bank options are train-embedder options naming the documents themselves.
    bank = shlex.split(lines[-1])
    assert bank == ["--bank", "300", "--bank-data", str(source)]
    assert set(load_corpus([str(source)]).texts) <= set(corpus.texts)  # the bank's texts are training data
    # Deterministic: a second run writes the same bytes.
    assert main(["adapt-text", str(source), "--out", str(tmp_path / "b"), "--spans", "2"]) == 0
    spans_file = "cranfield-spans.txt"
    assert (tmp_path / "b" / spans_file).read_bytes() == (tmp_path / "a" / spans_file).read_bytes()


def _status(argv: list[str]) -> int | str | None:
    """The exit status of `leafkd ARGV`: returned by a command, or the parser's exit on a bad option."""
    try:
        return main(argv)
    except SystemExit as e:
        return e.code


def test_adapt_text_errors_are_one_line(tmp_path, data_dir, capsys):
    assert _status(["adapt-text", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "o")]) == 2
    assert _status(["adapt-text", str(tmp_path), "--out", str(tmp_path / "o")]) == 2  # a folder without corpus.jsonl
    assert _status(["adapt-text", str(data_dir / "classic" / "npl"), "--out", str(tmp_path / "o"), "--spans",
                    "-1"]) == 2
    # A good source before a bad one: nothing is written for either.
    assert _status(["adapt-text", str(data_dir / "classic" / "cranfield"), str(tmp_path / "missing.txt"),
                    "--out", str(tmp_path / "o")]) == 2
    (tmp_path / "file").write_text("x")
    assert _status(["adapt-text", str(data_dir / "classic" / "cranfield"), "--out", str(tmp_path / "file")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 5 and all(line.startswith("error: ") for line in err)
    assert "missing.txt" in err[0] and "corpus.jsonl" in err[1] and "--spans" in err[2] and "missing.txt" in err[3]
    assert "not a folder" in err[4] and (tmp_path / "file").read_text() == "x"
    assert not (tmp_path / "o").exists()


def test_adapt_text_source_weight_and_column_are_parsed(tmp_path, capsys):
    table = tmp_path / "docs.tsv"
    table.write_text("id\tbody\n1\tThe wing stalls at high angles of attack. Lift then drops sharply.\n")
    assert main(["adapt-text", f"{table}#body*2", "--out", str(tmp_path / "o"), "--spans", "1"]) == 0
    assert (tmp_path / "o" / "docs-pieces.txt").read_text() == (
        "The wing stalls at high angles of attack.\nLift then drops sharply.\n")
    assert f"--data '{table}#body*3'" in capsys.readouterr().out  # the given weight replaced by --weight
