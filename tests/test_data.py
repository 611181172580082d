"""Corpus readers: formats, weights, dedup, and one-line errors naming file and line."""

import json

import pytest

from leafkd.data.beir import read_beir
from leafkd.data.sources import Source, load_corpus, read_texts, text_hash
from leafkd.errors import LeafkdError


def test_formats_and_dedup(tmp_path):
    (tmp_path / "a.txt").write_text("alpha\n\n  beta  \nalpha\n")
    (tmp_path / "b.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ({"title": "T", "text": "gamma"},
                                                                            {"text": "beta"})))
    (tmp_path / "c.tsv").write_text("id\ttext\n1\tdelta\n2\talpha\n")
    (tmp_path / "d.tsv").write_text("x\ty\tepsilon\n")
    corpus = load_corpus([str(tmp_path / "a.txt"), f"{tmp_path / 'b.jsonl'}*2", str(tmp_path / "c.tsv"),
                          f"{tmp_path / 'd.tsv'}#3"])
    assert corpus.texts == ["alpha", "beta", "T gamma", "delta", "epsilon"]
    # One row per unique text; each occurrence adds its source's weight, so sampling keeps the original
    # frequencies: alpha = 1 + 1 (a.txt) + 1 (c.tsv); beta = 1 (a.txt) + 2 (b.jsonl, weight 2).
    assert corpus.weights.tolist() == [3.0, 3.0, 2.0, 1.0, 1.0]


def test_source_spec_parsing():
    s = Source.parse("data/x.tsv#question*0.5")
    assert (str(s.path), s.column, s.weight) == ("data/x.tsv", "question", 0.5)
    with pytest.raises(LeafkdError, match="weight"):
        Source.parse("x.txt*abc")


def test_errors_name_file_and_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"text": broken\n')
    with pytest.raises(LeafkdError, match=r"bad.jsonl:2: malformed JSON"):
        read_texts(str(bad))
    nofield = tmp_path / "nf.jsonl"
    nofield.write_text('{"body": "x"}\n')
    with pytest.raises(LeafkdError, match=r"nf.jsonl:1: no 'text' field"):
        read_texts(str(nofield))
    with pytest.raises(LeafkdError, match="no such file"):
        read_texts(str(tmp_path / "missing.txt"))
    (tmp_path / "e.txt").write_text("\n  \n")
    with pytest.raises(LeafkdError, match="empty"):
        load_corpus([str(tmp_path / "e.txt")])
    (tmp_path / "c.tsv").write_text("a\tb\n1\t2\n")
    with pytest.raises(LeafkdError, match="no column 'text'"):
        read_texts(str(tmp_path / "c.tsv"))


def test_max_texts_sample_is_seeded(tmp_path):
    (tmp_path / "a.txt").write_text("\n".join(f"t{i}" for i in range(100)))
    a = load_corpus([str(tmp_path / "a.txt")], max_texts=10, seed=1)
    b = load_corpus([str(tmp_path / "a.txt")], max_texts=10, seed=1)
    assert a.texts == b.texts and len(a) == 10
    assert len({text_hash(t) for t in a.texts}) == 10


def test_read_beir_real(data_dir):
    rs = read_beir(data_dir / "beir" / "scifact")
    assert len(rs.corpus) == 5183 and len(rs.queries) == 300
    assert sum(len(v) for v in rs.qrels.values()) == 339


def test_read_beir_errors(tmp_path, data_dir):
    folder = tmp_path / "set"
    (folder / "qrels").mkdir(parents=True)
    (folder / "corpus.jsonl").write_text(json.dumps({"_id": "d1", "title": "", "text": "x"}) + "\n")
    (folder / "queries.jsonl").write_text(json.dumps({"_id": "q1", "text": "y"}) + "\n")
    with pytest.raises(LeafkdError, match=r"qrels/test.tsv: no such file"):
        read_beir(folder)
    (folder / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq1\td9\t1\n")
    with pytest.raises(LeafkdError, match=r"test.tsv:2: document id 'd9'"):
        read_beir(folder)
    (folder / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq1\td1\n")
    with pytest.raises(LeafkdError, match=r"test.tsv:2: expected 3"):
        read_beir(folder)
    (folder / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\n")
    with pytest.raises(LeafkdError, match="no judged queries"):
        read_beir(folder)
