"""The flagship recipe (issue 6) in one command: capture once, train the ablation runs, evaluate them all.

    python eval/flagship.py --stage all                  # capture + 3 trainings + evaluation
    python eval/flagship.py --stage train --runs leaf    # only the LEAF-loss run
    python eval/flagship.py --stage eval
    python eval/flagship.py --runs adapted               # + the retrieval corpora's documents (see below)
    python eval/flagship.py --runs adapted-bank300       # the corpus-adapted recipe: corpora 3x, 384-token student,
                                                         # 4 query-sized spans per document, bank loss on the
                                                         # corpora's documents (weight 300)
    python eval/flagship.py --runs adapted-bank300 --set seed=1   # the same with another seed
    python eval/flagship.py --runs leaf-pkgdocs          # the generic recipe + Debian's scientific package docs

Each run is `examples/flagship.toml` with its loss weights overridden; all share one teacher-vector store.
Evaluation is `leafkd eval` (fast engine where mteb is absent) on SciFact, Cranfield, NPL, STS-B and SICK-R, for
the teacher, the base student, the ridge map and every trained student (student and asymmetric modes),
with alignment diagnostics. Results land in --out (default eval/results/flagship).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# "leaf" is the recipe as it stands in the config; the ablation runs fix 5 epochs at lr 3e-4 (as recorded in
# eval/RESULTS.md) and change one thing each. Keys override any TrainConfig option.
ABLATION = {"lr": 3e-4, "epochs": 5}
ADAPTED_CROPS4 = {"leaf_l2": 1.0, "adapt": ["beir/scifact", "classic/cranfield", "classic/npl"], "adapt_weight": 3,
                  "adapt_crops": 4, "max_seq_length": 384}
RUNS = {
    "leaf": {"leaf_l2": 1.0},
    "ablation-leaf": {**ABLATION, "leaf_l2": 1.0},
    "ablation-leaf+lelp": {**ABLATION, "leaf_l2": 1.0, "lelp": 1.0},
    "ablation-leaf+lelp50": {**ABLATION, "leaf_l2": 1.0, "lelp": 50.0},
    "ablation-leaf+relational": {**ABLATION, "leaf_l2": 1.0, "relational": 1.0},
    "ablation-leaf-lr1e-3": {**ABLATION, "leaf_l2": 1.0, "lr": 1e-3},
    # Corpus adaptation: the documents of the three retrieval sets (never their queries, never their relevance
    # labels, nothing of STS-B or SICK-R) join the training text, whole and cut into sentence-sized pieces.
    # An index's documents are embedded by the teacher anyway, so in deployment their vectors come free.
    "adapted": {"leaf_l2": 1.0, "adapt": ["beir/scifact", "classic/cranfield", "classic/npl"]},
    # Variants of the corpus adaptation: the corpora's texts visited 3x per epoch; the student reading up to 384
    # tokens (the teacher's limit) instead of MiniLM's 256, so long documents are matched on what the teacher saw.
    "adapted-w3": {"leaf_l2": 1.0, "adapt": ["beir/scifact", "classic/cranfield", "classic/npl"], "adapt_weight": 3},
    "adapted-len384": {"leaf_l2": 1.0, "adapt": ["beir/scifact", "classic/cranfield", "classic/npl"],
                       "max_seq_length": 384},
    "adapted-w3-len384": {"leaf_l2": 1.0, "adapt": ["beir/scifact", "classic/cranfield", "classic/npl"],
                          "adapt_weight": 3, "max_seq_length": 384},
    "adapted-w5-len384": {"leaf_l2": 1.0, "adapt": ["beir/scifact", "classic/cranfield", "classic/npl"],
                          "adapt_weight": 5, "max_seq_length": 384},
    # + query-sized random spans of the documents (4-32 words, K per document, drawn once with a fixed seed):
    # new short texts from the target domain instead of more visits to the same ones.
    "adapted-w3-len384-crops4": ADAPTED_CROPS4,
    # + the bank loss (leafkd.losses.BankRelationalLoss): each student vector should rank the corpora's documents
    # (their teacher vectors, the index's own) as the teacher's vector of the same text does. Teacher vectors only.
    # 300 is the corpus-adapted recipe (eval/RESULTS.md: 99.72% of the teacher over 5 seeds; 100: 99.47%, 4 seeds).
    "adapted-bank100": {**ADAPTED_CROPS4, "bank": 100.0, "bank_corpus": True},
    "adapted-bank300": {**ADAPTED_CROPS4, "bank": 300.0, "bank_corpus": True},
    # + prose paragraphs of Debian's documentation of scientific Python packages (eval/package_text.py): passage-
    # like text from the package indexes, the issue's suggestion for the generic recipe.
    "leaf-pkgdocs": {"leaf_l2": 1.0, "package_text": True},
    # the same with 18 more documentation packages (161,578 paragraphs instead of 85,799)
    "leaf-pkgdocs-more": {"leaf_l2": 1.0, "package_text": "more"},
    # the paragraphs and their sentences (leafkd.adapt.split_pieces): query-sized text of the same kind
    "leaf-pkgdocs-pieces": {"leaf_l2": 1.0, "package_text": True, "package_pieces": True},
    # + the bank loss against a seeded sample of 65,536 training texts (no target corpus is known)
    "leaf-pkgdocs-bank": {"leaf_l2": 1.0, "package_text": True, "bank": 100.0},
}


def corpus_pieces(data_dir: Path, folders: list[str], out: Path, crops: int = 0) -> tuple[list[str], list[str]]:
    """Data sources for the documents of `folders`: each BEIR folder whole, plus a text file of its documents cut
    into sentence pieces (leafkd.adapt.split_pieces); with `crops` > 0, also a file of that many random 4-32-word
    spans per document (leafkd.adapt.random_spans; second list returned). `leafkd adapt-text` does the same for
    any corpus; the order and seeds here are the ones of the recorded runs."""
    from leafkd.atomic import write_text
    from leafkd.data.adaptation import adaptation_text, random_spans
    from leafkd.data.beir import read_beir
    from leafkd.data.sources import join_title

    sources, crop_sources = [], []
    for folder in folders:
        rs = read_beir(data_dir / folder)
        pieces, _ = adaptation_text(data_dir / folder, spans=0)
        out.mkdir(parents=True, exist_ok=True)
        path = out / f"{folder.replace('/', '-')}-sentences.txt"
        write_text(path, "\n".join(pieces) + "\n")
        print(f"{folder}: {len(rs.corpus)} documents, {len(pieces)} sentence pieces -> {path}", flush=True)
        sources += [str(data_dir / folder), str(path)]
        if crops:
            docs = [join_title(d["title"], d["text"]) for _, d in sorted(rs.corpus.items())]
            spans = random_spans(docs, crops, seed=f"{folder}:crops")
            crop_path = out / f"{folder.replace('/', '-')}-crops{crops}.txt"
            write_text(crop_path, "\n".join(spans) + "\n")
            print(f"{folder}: {len(spans)} random spans -> {crop_path}", flush=True)
            crop_sources.append(str(crop_path))
    return sources, crop_sources


def package_text_file(folder: str, more: bool) -> Path:
    """eval/package_text.py's paragraphs file in `folder`, built (download from Debian) when it is not there."""
    path = Path(folder) / ("package-docs-more.txt" if more else "package-docs.txt")
    if not path.is_file():
        from package_text import build

        print(f"{path} not found: building it from Debian's documentation packages", flush=True)
        build(Path(folder), "http://deb.debian.org/debian", more)
    return path.resolve()


def run_name(name: str, args) -> str:
    """Folder name of a run: the run's name, plus each --set override (`adapted-w3-len384-seed1`)."""
    suffix = "".join(f"-{k}{v}" for k, v in args.set.items())
    return f"{name}{suffix}".replace("+", "-")


def parse_set(item: str) -> dict:
    """KEY=VALUE with a TOML value (`seed=1`, `lr=2e-3`, `loss="x"`); a bare word is a string."""
    import tomllib

    key, sep, value = item.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"--set {item!r}: expected KEY=VALUE")
    try:
        parsed = tomllib.loads(f"v = {value}")["v"]
    except tomllib.TOMLDecodeError:
        parsed = value
    return {key.strip(): parsed}


def run_config(name: str, args) -> dict:
    import tomllib

    base = tomllib.loads((REPO / args.config).read_text())["train"]
    data_dir = str(Path(args.data_dir).resolve())
    base["data"] = [d.replace("../shared/data", data_dir) for d in base["data"]]
    run = {**RUNS[name], **args.set}
    adapt = run.pop("adapt", None)
    adapt_weight = run.pop("adapt_weight", 1)
    crops = run.pop("adapt_crops", 0)
    package_text = run.pop("package_text", False)
    package_pieces = run.pop("package_pieces", False)
    bank_corpus = run.pop("bank_corpus", False)
    if package_text:
        text_file = package_text_file(args.package_text_dir, more=package_text == "more")
        base["data"] = base["data"] + [str(text_file)]
        if package_pieces:
            from leafkd.atomic import write_text
            from leafkd.data.adaptation import adaptation_text

            pieces, _ = adaptation_text(text_file, spans=0)
            pieces_file = Path(args.runs_dir) / "package-pieces" / f"{text_file.stem}-sentences.txt"
            write_text(pieces_file, "\n".join(pieces) + "\n")
            print(f"{text_file.name}: {len(pieces)} sentence pieces -> {pieces_file}", flush=True)
            base["data"].append(str(pieces_file))
    if adapt:
        sources, crop_sources = corpus_pieces(Path(data_dir), adapt, Path(args.runs_dir) / "corpus-pieces", crops)
        base["data"] = base["data"] + [f"{s}*{adapt_weight}" if adapt_weight != 1 else s for s in sources]
        base["data"] += crop_sources  # visited once per epoch: they add variety, not repetition
        if bank_corpus:  # the bank: the corpora's whole documents, as the index holds them
            base["bank_data"] = [str(Path(data_dir) / folder) for folder in adapt]
    base.update(run)
    base["output"] = str(Path(args.runs_dir) / f"flagship-{run_name(name, args)}")
    # One store per data mix (the store holds the teacher vectors of exactly the texts it was built from).
    mix = ("adapted" + (f"-crops{crops}" if crops else "")) if adapt else ""
    pkg = (("pkgdocs-more" if package_text == "more" else "pkgdocs") + ("-pieces" if package_pieces else "")
           if package_text else "")
    mix = "-".join(m for m in (mix, pkg) if m)
    base["vectors"] = str(Path(args.runs_dir) / ("flagship-vectors" + (f"-{mix}" if mix else "")))
    if args.epochs is not None:
        base["epochs"] = args.epochs
    if args.teacher:
        base["teacher"] = args.teacher
    if args.student:
        base["student"] = args.student
    base["progress"] = False
    return base


def stage_train(args) -> dict:
    from leafkd.training.config import load_config
    from leafkd.training.trainer import train

    timings = {}
    for name in args.runs:
        cfg = load_config(None, **run_config(name, args))
        t = time.perf_counter()
        result = train(cfg, log=lambda m: print(f"[{name}] {m}", flush=True))
        timings[run_name(name, args)] = {"seconds": time.perf_counter() - t, **result}
        print(f"[{name}] done in {time.perf_counter() - t:.0f} s: {json.dumps(result['final'])}", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    prev = json.loads((out / "train_summary.json").read_text()) if (out / "train_summary.json").exists() else {}
    prev.update(timings)
    (out / "train_summary.json").write_text(json.dumps(prev, indent=2))
    return timings


def stage_eval(args) -> None:
    out = Path(args.out)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    for i, name in enumerate(args.runs):
        model = Path(args.runs_dir) / f"flagship-{run_name(name, args)}" / "model"
        cmd = [sys.executable, "-m", "leafkd", "eval", "--student", str(model), "--data-dir", args.data_dir,
               "--out", str(out / f"eval-{run_name(name, args)}"), "--engine", args.engine]
        if args.teacher:
            cmd += ["--teacher", args.teacher]
        # The first run's table carries the teacher, base and ridge rows; the others add their own student rows.
        cmd += ["--modes", "teacher,student,asymmetric,base,ridge", "--ridge", "--alignment"] if i == 0 else \
               ["--modes", "student,asymmetric", "--alignment"]
        print(" ".join(cmd), flush=True)
        t = time.perf_counter()
        subprocess.run(cmd, check=True, env=env)
        print(f"eval {name}: {time.perf_counter() - t:.0f} s", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--stage", choices=["train", "eval", "all"], default="all")
    p.add_argument("--runs", type=lambda s: s.split(","), default=["leaf"], help=f"comma-separated, from {', '.join(RUNS)}")
    p.add_argument("--config", default="examples/flagship.toml")
    p.add_argument("--data-dir", default=os.environ.get("LEAFKD_DATA", str(REPO.parent / "shared" / "data")))
    p.add_argument("--runs-dir", default="runs")
    p.add_argument("--out", default="eval/results/flagship")
    p.add_argument("--epochs", type=float, default=None, help="override the config's epochs")
    p.add_argument("--teacher", default=None, help="override the teacher folder")
    p.add_argument("--student", default=None, help="override the student base folder")
    p.add_argument("--engine", default="fast")
    p.add_argument("--package-text-dir", default="runs/package-text",
                   help="folder of eval/package_text.py's paragraph files (built there when missing)")
    p.add_argument("--set", type=parse_set, action="append", default=[], metavar="KEY=VALUE",
                   help="override a training option in every run (repeatable; e.g. seed=1); named in the run folders")
    args = p.parse_args()
    args.set = {k: v for item in args.set for k, v in item.items()}
    unknown = [r for r in args.runs if r not in RUNS]
    if unknown:
        sys.exit(f"error: unknown run(s) {', '.join(unknown)} (known: {', '.join(RUNS)})")
    if args.stage in ("train", "all"):
        stage_train(args)
    if args.stage in ("eval", "all"):
        stage_eval(args)


if __name__ == "__main__":
    from leafkd.errors import LeafkdError

    try:
        main()
    except LeafkdError as e:  # a user error (a missing data folder, a bad config): one line, no traceback
        sys.exit(f"error: {e}")
