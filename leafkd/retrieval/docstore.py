"""The document store of an index: one ``[id, title, text]`` JSON row a line, in row order."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from leafkd.atomic import atomic_path
from leafkd.errors import LeafkdError


def write_docs(path: Path, ids: Sequence[str | None], titles: Sequence[str], texts: Sequence[str]) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            for row in zip(ids, titles, texts):
                f.write(json.dumps(row, ensure_ascii=False))
                f.write("\n")


def read_docs(path: Path) -> tuple[list[str | None], list[str], list[str]]:
    ids: list[str | None] = []
    titles: list[str] = []
    texts: list[str] = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            try:
                i, t, x = json.loads(line)
            except (ValueError, TypeError):
                raise LeafkdError(f"{path}:{lineno}: not a document row") from None
            ids.append(i)
            titles.append(t)
            texts.append(x)
    return ids, titles, texts


