"""Passage-like training text from the documentation that Debian ships for scientific Python packages.

    python eval/package_text.py                       # -> runs/package-text/package-docs.txt
    python eval/package_text.py --more                # 29 packages -> runs/package-text/package-docs-more.txt
    python eval/package_text.py --out DIR --mirror http://deb.debian.org/debian

Issue 6 asks whether more passage-like text, built reproducibly from the package indexes, helps the generic
recipe (the one that never sees the target corpus). This script downloads the pinned `.deb` files below (Debian
12 "bookworm", checked against their SHA-256), reads every HTML page of their documentation, and keeps the prose
paragraphs (the text of each `<p>` with inline code left out; 8+ words, at least 85% letters and spaces): one
paragraph a line, deduplicated, in a fixed order, written atomically. The packages were picked by topic
(science and engineering documentation), never by an evaluation score. Measured in eval/RESULTS.md: the 11
packages lift the generic recipe's asymmetric retrieval from 83.5% to 87.6% of the teacher (3 seeds each);
the 29 of --more add nothing further. Nothing is copied into the project; the .deb files are cached under --out.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import re
import sys
import tarfile
import urllib.request
from html.parser import HTMLParser
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from leafkd.atomic import write_bytes, write_text  # noqa: E402
from leafkd.errors import LeafkdError  # noqa: E402

# (pool path in the Debian archive, SHA-256 of the .deb): Debian 12 "bookworm", main, as of 2026-11-22.
PACKAGES = [
    ("pool/main/s/scipy/python-scipy-doc_1.10.1-2_all.deb",
     "a237fdcef1675622f1a5d8a291c64feba140615130ee625554f94772d4ea3ad7"),
    ("pool/main/a/astropy/python-astropy-doc_5.2.1-2+deb12u1_all.deb",
     "d7cfa77ec5239a4ebcdf27c7cdc3d9e604228e99257f91d4260abbb970469b91"),
    ("pool/main/s/sympy/python-sympy-doc_1.11.1-1_all.deb",
     "2a1d50bd49738f0280308fc8d86d5fa5739dbc6391e1c754f4549bc3635e6a31"),
    ("pool/main/p/python-biopython/python-biopython-doc_1.80+dfsg-4_all.deb",
     "350b871fa68e73e7dee78d6affec8a27bcbb31cd690843a82aefe187dab1712f"),
    ("pool/main/s/scikit-learn/python-sklearn-doc_1.2.1+dfsg-1_all.deb",
     "4e244556326064e87e7563e3e544c2288d44b5719db2d7b3a85c9a84ae93488d"),
    ("pool/main/s/statsmodels/python-statsmodels-doc_0.13.5+dfsg-7_all.deb",
     "4167a3e13347343b9f0a6677fc804ecad80dd735d17bc051829610f6f1bc2afb"),
    ("pool/main/s/skimage/python-skimage-doc_0.19.3-8_all.deb",
     "2c87d8f7d4504b29fe80283a24a153fb4175b0e4964bd90a2a0152b36bb6b468"),
    ("pool/main/p/pydicom/python-pydicom-doc_2.3.1-1_all.deb",
     "51fa464f346895d0dddc21e0815f6390a0ea8bbfc771b63c729624859c9bfb08"),
    ("pool/main/n/nibabel/python-nibabel-doc_5.0.0-2_all.deb",
     "acf6a1975441b9962c190b4b812d63c3c228ca1fb7560153a3f65b704a9976f1"),
    ("pool/main/p/python-ase/python-ase-doc_3.22.1-3+deb12u1_all.deb",
     "8af9e1eda4f6b116c684500daf845aaa2781b1ee04c0a0f42133302546551eb5"),
    ("pool/main/p/pymatgen/python-pymatgen-doc_2022.11.7+dfsg1-11+deb12u2_all.deb",
     "5bf2a83c29a98b24405fe0cec0ce29f0bf5719672fc54d9c28833b417e366555"),
]

# `--more`: 18 further documentation packages of the same kinds (fluid dynamics, quantum optics, X-ray
# diffraction, molecular dynamics, neuroimaging, bioinformatics, astronomy, numerics, data analysis), added in a
# second round to see whether the gain grows with the amount of such text. Written to package-docs-more.txt
# (PACKAGES first, then these).
MORE_PACKAGES = [
    ("pool/main/p/python-fluids/python-fluids-doc_1.0.22-2_all.deb",
     "5a3a0c63a8032a0b33707fd763e7d1e69ee8a64062c2840f17eb1c8fbe84726c"),
    ("pool/main/l/lmfit-py/python-lmfit-doc_1.1.0-1_all.deb",
     "c7ed21ecd1b3aedf5592bdf06b548e89a20c3432bde6539c1326917a874df6ff"),
    ("pool/main/n/nitime/python-nitime-doc_0.9-5_all.deb",
     "6450ee3e5ef57a6d3a3a5e2755f63fcd34a6737565ad22f8a801bf7e001e30ba"),
    ("pool/main/d/dipy/python-dipy-doc_1.6.0-1_all.deb",
     "9d58310ab36b904fe814c19fcf9d05770a574bb06920b1236c19e6ac4acde3c9"),
    ("pool/main/m/mdanalysis/python-mdanalysis-doc_2.4.2+dfsg1-1_all.deb",
     "f5070b1849e1d58481d9c29c875df17b9db5764c15abac7731fd43120541a1b4"),
    ("pool/main/q/qutip/python-qutip-doc_4.7.1-2_all.deb",
     "8d0b6f38de89e684dce972742b89fe0322dd32879eae2c514bc09633fdd7ae74"),
    ("pool/main/p/pyfai/python-pyfai-doc_0.21.3+dfsg1-4_all.deb",
     "5db668017620fc0265dcde91c2888817f24205c6bd8f368184503307d5830962"),
    ("pool/main/s/silx/python-silx-doc_1.1.0+dfsg-5_all.deb",
     "8f58072dea5be22166bbbfac8d612fea43596ba2ca98848e6bc58e06d172ce3b"),
    ("pool/main/a/astroplan/python-astroplan-doc_0.7-4_all.deb",
     "703ae9fb0134efe2e394116f3da4d9729e32f1f9fd137e03e26b2dc094d34094"),
    ("pool/main/a/astroquery/python-astroquery-doc_0.4.6+dfsg-4_all.deb",
     "cc449493e55359c7cc5eb819b47b730d061954d84e4359825bd4a4488a6c2aad"),
    ("pool/main/m/mpmath/python-mpmath-doc_1.2.1-2_all.deb",
     "3895ea83b1edc71fae2a4be29522b9dd28daf6aad5293a2249d46742ffbbfeed"),
    ("pool/main/o/octave/octave-doc_7.3.0-2_all.deb",
     "b27897cc7e3d688daa5cb8f8d1ea47077f3fbd205ce32e22522200ff0c1eadd5"),
    ("pool/main/m/maxima/maxima-doc_5.46.0-11_all.deb",
     "01a726b693a7e465a62040ac5ade4762194d7553524231d77cd1fcd4a69a75b9"),
    ("pool/main/p/python-xarray/python-xarray-doc_2023.01.0-1.1_all.deb",
     "1d42be6f1c4b0c4c5b37a4b8884d7483d9995d8b6362ee490579806d8b4ba9e2"),
    ("pool/main/p/pandas/python-pandas-doc_1.5.3+dfsg-2_all.deb",
     "4998405ff6b12432f46594963e95554ade1104705795428396345fca58d853f8"),
    ("pool/main/n/nipype/python-nipype-doc_1.8.5-3_all.deb",
     "2f65bb04bf948eb6c49aaf803affa425b6fe76a635f125341e14ad229b1e604f"),
    ("pool/main/p/python-skbio/python-skbio-doc_0.5.8-4_all.deb",
     "f9b55a6f6b18a0d1da4c03b61807585991636d32216347ccaae79f0fc0676509"),
    ("pool/main/r/r-base/r-doc-html_4.2.2.20221110-2_all.deb",
     "2c615dd386993a440b80fd4e9060318386e31fbe47f5be65f295f5fb34002c5c"),
]

# Debian's archive of every past state of the pool, for when the live mirror drops a pinned version after a point
# release (its documented layout: a timestamp, then the pool paths; not reachable from the network this was built
# on, so untested here).
SNAPSHOT = "https://snapshot.debian.org/archive/debian/20261122T000000Z"

# Generated pages that hold no prose of their own (highlighted source, indexes, search).
_SKIP_PAGE = re.compile(r"/(_modules|_sources)/|/(genindex|py-modindex|search)\.html$")
_SKIP_TAGS = {"pre", "code", "script", "style"}


class _Paragraphs(HTMLParser):
    """Text of every <p>, leaving out what sits inside code, script or style elements."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.paragraphs: list[str] = []
        self._buf: list[str] | None = None
        self._skip = 0

    def handle_starttag(self, tag: str, attrs) -> None:
        if tag in _SKIP_TAGS:
            self._skip += 1
        elif tag == "p":
            self._buf = []

    def handle_endtag(self, tag: str) -> None:
        if tag in _SKIP_TAGS:
            self._skip = max(0, self._skip - 1)
        elif tag == "p" and self._buf is not None:
            self.paragraphs.append(" ".join("".join(self._buf).split()))
            self._buf = None

    def handle_data(self, data: str) -> None:
        if self._buf is not None and not self._skip:
            self._buf.append(data)


def is_prose(text: str, min_words: int = 8, min_letters: float = 0.85) -> bool:
    """A sentence-like paragraph: enough words, and mostly letters and spaces (not a signature or a formula)."""
    if len(text.split()) < min_words:
        return False
    return sum(c.isalpha() or c == " " for c in text) / len(text) >= min_letters


def html_paragraphs(html: str) -> list[str]:
    """Prose paragraphs of one HTML page, in page order."""
    parser = _Paragraphs()
    parser.feed(html)
    parser.close()
    return [p for p in parser.paragraphs if is_prose(p)]


def deb_data_tar(deb: bytes) -> tarfile.TarFile:
    """The data archive of a .deb (an `ar` archive holding control.tar.* and data.tar.*)."""
    if not deb.startswith(b"!<arch>\n"):
        raise LeafkdError("not a .deb file (no ar header)")
    pos = 8
    while pos + 60 <= len(deb):
        header = deb[pos : pos + 60]
        name = header[:16].decode("ascii", "replace").strip().rstrip("/")
        try:
            size = int(header[48:58].decode("ascii").strip())
        except ValueError:
            raise LeafkdError("malformed .deb (bad ar member header)") from None
        if name.startswith("data.tar"):
            try:
                return tarfile.open(fileobj=io.BytesIO(deb[pos + 60 : pos + 60 + size]), mode="r:*")
            except tarfile.ReadError:  # e.g. data.tar.zst, which Python 3.11's tarfile cannot read
                raise LeafkdError(f"cannot read the .deb's {name} (gzip, bzip2 and xz are supported)") from None
        pos += 60 + size + (size % 2)
    raise LeafkdError("the .deb has no data.tar member")


def deb_paragraphs(deb: bytes) -> list[str]:
    """Prose paragraphs of every documentation page in a .deb, pages in sorted path order."""
    with deb_data_tar(deb) as tar:
        members = sorted((m for m in tar.getmembers() if m.isfile() and m.name.endswith(".html")
                          and not _SKIP_PAGE.search(m.name)), key=lambda m: m.name)
        out = []
        for m in members:
            out += html_paragraphs(tar.extractfile(m).read().decode("utf-8", "replace"))
    return out


def fetch(pool_path: str, sha256: str, mirror: str, cache: Path) -> bytes:
    """The .deb's bytes, from the cache or the mirror, checked against its pinned SHA-256 (a cached copy that
    does not match is fetched again)."""
    path = cache / Path(pool_path).name
    if path.exists():
        data = path.read_bytes()
        if hashlib.sha256(data).hexdigest() == sha256:
            return data
    url = f"{mirror.rstrip('/')}/{pool_path}"
    try:
        with urllib.request.urlopen(url, timeout=60) as r:
            data = r.read()
    except OSError as e:  # a version dropped from the pool after a point release: 404
        raise LeafkdError(f"cannot download {url}: {e} (an archived copy: --mirror {SNAPSHOT})") from None
    digest = hashlib.sha256(data).hexdigest()
    if digest != sha256:
        raise LeafkdError(f"{Path(pool_path).name}: SHA-256 {digest} is not the pinned {sha256} "
                          "(the archive changed; pin the new version in eval/package_text.py)")
    write_bytes(path, data)
    return data


def build(out: Path, mirror: str, more: bool = False) -> Path:
    if out.exists() and not out.is_dir():
        raise LeafkdError(f"{out}: exists and is not a folder (the output folder)")
    paragraphs: dict[str, None] = {}
    for pool_path, sha256 in PACKAGES + (MORE_PACKAGES if more else []):
        found = deb_paragraphs(fetch(pool_path, sha256, mirror, out / "debs"))
        before = len(paragraphs)
        paragraphs.update(dict.fromkeys(found))
        print(f"{Path(pool_path).name}: {len(found)} paragraphs, {len(paragraphs) - before} new", flush=True)
    target = out / ("package-docs-more.txt" if more else "package-docs.txt")
    write_text(target, "\n".join(paragraphs) + "\n")
    words = sum(len(p.split()) for p in paragraphs)
    print(f"{len(paragraphs)} paragraphs, {words} words -> {target}")
    return target


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/package-text", help="folder for package-docs.txt and the .deb cache")
    p.add_argument("--mirror", default="http://deb.debian.org/debian", help="Debian archive to download from")
    p.add_argument("--more", action="store_true", help="add MORE_PACKAGES (writes package-docs-more.txt)")
    args = p.parse_args()
    try:
        build(Path(args.out), args.mirror, args.more)
    except LeafkdError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
