"""`leafkd export`: the asymmetric pair as one sentence-transformers model (Router.for_query_document).

The result loads with plain `SentenceTransformer(path)`; `encode_query` runs the student, `encode_document` (and
plain `encode`) the teacher, so tools that know sentence-transformers' query/document routing (mteb included) use
the pair as intended.
"""

from __future__ import annotations

import argparse

from leafkd.cli.options import output_folder


def _run(args: argparse.Namespace) -> int:
    from leafkd.student.export import export_pair  # loads sentence-transformers: not at `leafkd --help`

    out = export_pair(args.student, args.teacher, args.out)
    print(f"wrote {out}: encode_query -> student, encode_document -> teacher")
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("export", help="save student + teacher as one Router.for_query_document model")
    p.add_argument("--student", required=True, help="trained student folder (with leafkd.json)")
    p.add_argument("--teacher", default=None, help="teacher folder (default: the one in leafkd.json)")
    p.add_argument("--out", required=True, type=output_folder, help="output folder")
    p.set_defaults(func=_run)
