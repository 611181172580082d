"""Student kinds (issue 21): the teacher's own layers, a cut MiniLM, a static table; each builds, trains a few steps,
saves, and loads with plain SentenceTransformer(path)."""

import json

import numpy as np
import pytest

from leafkd.errors import LeafkdError
from leafkd.pipeline.config import DistillConfig
from leafkd.student.layers import canonical_layers, layer_indices
from leafkd.training.config import StudentKind, load_config
from leafkd.training.trainer import train


@pytest.fixture(scope="module")
def texts_file(tmp_path_factory, data_dir):
    lines = (data_dir / "train" / "questions.tsv").read_text().splitlines()[1:2401:10]
    path = tmp_path_factory.mktemp("students") / "texts.txt"
    path.write_text("\n".join(line.split("\t")[0] for line in lines) + "\n")
    return path


def test_layer_specs_have_one_spelling_and_refuse_what_does_not_fit():
    assert canonical_layers("first:6") == canonical_layers("6") == canonical_layers(6) == 6
    assert canonical_layers("every:2") == canonical_layers("every-other") == "every:2"
    assert canonical_layers([0, 3]) == canonical_layers("0, 3") == "0,3"
    assert canonical_layers(None) is None and canonical_layers("all") is None
    assert layer_indices("every:2", 12) == [0, 2, 4, 6, 8, 10] and layer_indices("first:3", 12) == [0, 1, 2]
    assert layer_indices("1,5", 6) == [1, 5] and layer_indices(None, 3) == [0, 1, 2]
    for bad in ("first:0", "last:2", "every:x", "a,b", True):
        with pytest.raises(LeafkdError):
            canonical_layers(bad)
    for bad, n in (("first:13", 12), ("3,1", 6), ("0,6", 6), ("2,2", 6)):
        with pytest.raises(LeafkdError):
            layer_indices(bad, n)


def test_named_students_resolve_to_the_teacher_in_training_and_distill_options():
    cfg = load_config(None, teacher="t", data=["d"], student="teacher", student_layers="first:2")
    assert cfg.student == "t" and cfg.student_layers == 2 and cfg.student_kind is StudentKind.TRANSFORMER
    cfg = load_config(None, teacher="t", data=["d"], student="static")
    assert cfg.student == "t" and cfg.student_kind is StudentKind.STATIC
    plain = load_config(None, teacher="t", data=["d"], student="s")
    assert plain.result_key() == load_config(None, teacher="t", data=["d"], student="s",
                                             student_kind="transformer").result_key()
    assert plain.result_key() != load_config(None, teacher="t", data=["d"], student="s",
                                             student_layers=3).result_key()
    with pytest.raises(LeafkdError, match="give --teacher"):
        load_config(None, teacher_vectors="v.npy", data=["d"], student="teacher")
    with pytest.raises(LeafkdError, match="no layers"):
        load_config(None, teacher="t", data=["d"], student="static", student_layers=2)
    with pytest.raises(LeafkdError, match="student_kind must be"):
        load_config(None, teacher="t", data=["d"], student_kind="lookup")
    with pytest.raises(LeafkdError, match="need a static student"):
        load_config(None, teacher="t", data=["d"], static_init="embeddings")
    distill = DistillConfig(corpus="c", teacher="t", student="static")
    assert distill.student == "t" and distill.train["student_kind"] == "static"
    distill = DistillConfig(corpus="c", teacher="t", student="teacher", student_layers="every:2")
    assert distill.student == "t" and distill.train["student_layers"] == "every:2"


def test_one_string_names_a_frontier_point_with_the_same_result_key():
    """`--student teacher:first:6` is `--student teacher --student-layers first:6` (the frontier's names)."""
    spelled = load_config(None, teacher="t", data=["d"], student="teacher:first:6")
    split = load_config(None, teacher="t", data=["d"], student="teacher", student_layers="first:6")
    assert spelled.student == "t" and spelled.student_layers == 6
    assert spelled.result_key() == split.result_key()
    static = load_config(None, teacher="t", data=["d"], student="static:256")
    assert static.student_kind is StudentKind.STATIC and static.static_dim == 256
    assert load_config(None, teacher="t", data=["d"], student="teacher:every:2", student_layers="every:2"
                       ).student_layers == "every:2"  # the same value twice is fine
    cut = DistillConfig(corpus="c", teacher="t", student="s:first:2")
    assert cut.student == "s" and cut.train["student_layers"] == 2
    assert DistillConfig(corpus="c", teacher="t", student="static:64").train == {"student_kind": "static",
                                                                                  "static_dim": 64}
    for bad, message in [({"student": "teacher:first:6", "student_layers": 3}, "disagree"),
                         ({"student": "static:x"}, "static:DIM takes"), ({"student": "teacher:sideways"}, "after NAME")]:
        with pytest.raises(LeafkdError, match=message):
            load_config(None, teacher="t", data=["d"], **bad)


def test_a_folder_whose_name_has_a_colon_is_a_folder(tmp_path):
    folder = tmp_path / "model:v2"
    folder.mkdir()
    assert load_config(None, teacher="t", data=["d"], student=str(folder)).student == str(folder)


def _train_kind(tmp_path, texts_file, minilm_path, **student):
    out = tmp_path / "run"
    args = {"teacher": str(minilm_path), "data": [str(texts_file)], "heldout": 40, "max_steps": 4,
            "batch_size": 16, "lr": 1e-3, "projection_lr": 1e-3, "eval_every": 0, "checkpoint_every": 0,
            "output": str(out), "progress": False, "plot": False, "device": "cpu", **student}
    result = train(load_config(None, **args))
    return out / "model", result


@pytest.mark.parametrize("student", [
    {"student": "teacher", "student_layers": "every:3"},  # the teacher's layers 0 and 3
    {"student": "MINILM", "student_layers": "first:2", "projection": "always"},  # MiniLM cut + projection
    {"student": "static", "static_vocab": 200, "static_dim": 64},  # tokens through the teacher (200 here), PCA 64
    {"student": "static", "static_init": "embeddings", "static_dim": 64},  # the teacher's input embeddings, PCA 64
], ids=["teacher-every3", "minilm-first2", "static-forward", "static-embeddings"])
def test_each_student_kind_trains_saves_and_loads_as_plain_sentence_transformer(tmp_path, texts_file, minilm_path,
                                                                               student):
    from sentence_transformers import SentenceTransformer

    from leafkd.student.static import load_student

    if student.get("student") == "MINILM":
        student = {**student, "student": str(minilm_path)}
    model_dir, result = _train_kind(tmp_path, texts_file, minilm_path, **student)
    assert result["steps"] == 4 and np.isfinite(result["final"]["heldout_cos_mean"])
    modules = [m["type"].rsplit(".", 1)[-1] for m in json.loads((model_dir / "modules.json").read_text())]
    plain = SentenceTransformer(str(model_dir), device="cpu")
    texts = ["laminar flow over a flat plate", "who wrote invisible man"]
    vecs = plain.encode(texts, normalize_embeddings=True)
    assert vecs.shape == (2, 384) and np.all(np.isfinite(vecs))
    if student["student"] == "static":
        assert modules == ["StaticEmbedding", "Dense", "Normalize"]
        assert plain[0].embedding.weight.shape[1] == 64
    else:
        config = json.loads((model_dir / "config.json").read_text())
        assert modules[:2] == ["Transformer", "Pooling"] and config["num_hidden_layers"] == 2
        assert ("Dense" in modules) == ("projection" in student)
    # leafkd's own loading (the query encoder's padded batches) gives the same vectors as plain sentence-transformers
    ours = load_student(model_dir, device="cpu")
    tok = ours.tokenizer(texts, padding=True, return_tensors="pt")
    import torch

    with torch.inference_mode():
        out = ours({"input_ids": tok["input_ids"], "attention_mask": tok["attention_mask"]})["sentence_embedding"]
    out = torch.nn.functional.normalize(out, dim=-1).numpy()
    assert np.allclose(out, vecs, atol=1e-4)
    info = json.loads((model_dir / "leafkd.json").read_text())
    assert len(info["teacher_fingerprint"]) == 64


def test_static_vocabulary_rows_are_one_token_between_the_special_tokens(minilm_path):
    """all-MiniLM-L6-v2's tokenizer.json pads to 128: the table must still embed ``[CLS] token [SEP]`` (3 tokens),
    not the token followed by 125 attended padding tokens (wrong vectors, and ~40x the compute)."""
    import numpy as np
    import torch

    from leafkd.models import load_model
    from leafkd.student.static import _template, vocabulary_table

    base = load_model(minilm_path, device="cpu")
    rust = base.tokenizer.backend_tokenizer
    assert rust.padding is not None  # the case this guards: a padding tokenizer
    assert _template(rust) == ([101], [102])
    table = vocabulary_table(base, vocab=8, device="cpu")
    ids = torch.tensor([[101, 5, 102]])
    with torch.inference_mode():
        row = base({"input_ids": ids, "attention_mask": torch.ones_like(ids)})["sentence_embedding"][0].numpy()
    np.testing.assert_allclose(table[5], row, atol=1e-5)
