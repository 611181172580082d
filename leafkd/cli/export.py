"""`leafkd export`: the asymmetric pair as one sentence-transformers model (Router.for_query_document), or
(``--onnx``) a student's query pipeline as one ONNX graph for onnxruntime.

The pair loads with plain `SentenceTransformer(path)`; `encode_query` runs the student, `encode_document` (and
plain `encode`) the teacher, so tools that know sentence-transformers' query/document routing (mteb included) use
the pair as intended. The ONNX export (transformer or static table + pooling + Dense + normalisation, opset 17;
``--int8``: dynamic int8 weights) is what `leafkd serve --query-backend onnx` runs.
"""

from __future__ import annotations

import argparse

from leafkd.cli.options import output_folder
from leafkd.errors import LeafkdError


def _run_onnx(args: argparse.Namespace) -> int:
    from leafkd.student.onnx import export_onnx

    result = export_onnx(args.student, args.out, int8=args.int8)
    for kind, name in result.files.items():
        print(f"wrote {result.folder / name} ({kind}): cosine to torch min {result.cosine_min[kind]:.6f}, mean "
              f"{result.cosine_mean[kind]:.6f}")
    print(f"serve it: leafkd serve --index INDEX --student {args.student} --query-backend onnx")
    return 0


def _run(args: argparse.Namespace) -> int:
    if args.onnx:
        return _run_onnx(args)
    if args.int8:
        raise LeafkdError("--int8 needs --onnx")
    if args.out is None:
        raise LeafkdError("the pair export needs --out (or --onnx for an ONNX export of the student)")
    from leafkd.student.export import export_pair  # loads sentence-transformers: not at `leafkd --help`

    out = export_pair(args.student, args.teacher, args.out)
    print(f"wrote {out}: encode_query -> student, encode_document -> teacher")
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("export", help="save student + teacher as one Router.for_query_document model, or a student "
                       "as ONNX (--onnx)")
    p.add_argument("--student", required=True, help="trained student folder (with leafkd.json)")
    p.add_argument("--teacher", default=None, help="teacher folder (default: the one in leafkd.json)")
    p.add_argument("--out", type=output_folder, help="output folder (the pair: required; --onnx: default "
                   "STUDENT/leafkd-onnx, where `serve --query-backend onnx` looks)")
    p.add_argument("--onnx", action="store_true", help="export the student's query pipeline as ONNX (extra 'onnx')")
    p.add_argument("--int8", action="store_true", help="with --onnx: also a dynamically int8-quantised graph")
    p.set_defaults(func=_run)
