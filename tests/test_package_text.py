"""eval/package_text.py: prose paragraphs out of a real .deb layout (ar + data.tar.xz), checksums, clear errors."""

from __future__ import annotations

import hashlib
import importlib.util
import io
import sys
import tarfile
from pathlib import Path

import pytest

from leafkd.errors import LeafkdError

REPO = Path(__file__).resolve().parents[1]

PAGE = """<html><body><div class="body">
<h1>Boundary layers</h1>
<p>The boundary layer thickens downstream as viscous effects spread away from the wall surface.</p>
<p>Call <code>solve(x, y)</code> with the grid; the solver returns the velocity field on every node.</p>
<p>See also.</p>
<p>x = 3.0 * (1 + 2) / 4 ** 2 - 7 + 9 / 11 = ?</p>
<pre><p>Code blocks are never prose even when they hold enough plain words to pass.</p></pre>
<p>The boundary layer thickens downstream as viscous effects spread away from the wall surface.</p>
</div></body></html>"""


def _load():
    spec = importlib.util.spec_from_file_location("package_text", REPO / "eval" / "package_text.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["package_text"] = module
    spec.loader.exec_module(module)
    return module


def _tar_xz(files: dict[str, str]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:xz") as tar:
        for name, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _deb(files: dict[str, str], data_member: tuple[str, bytes] | None = None) -> bytes:
    """A .deb as dpkg-deb writes it: an ar archive of debian-binary, control.tar.xz and data.tar.xz."""
    out = b"!<arch>\n"
    for name, data in [("debian-binary", b"2.0\n"), ("control.tar.xz", _tar_xz({"./control": "Package: x\n"})),
                       data_member or ("data.tar.xz", _tar_xz(files))]:
        out += f"{name + '/':<16}{0:<12}{0:<6}{0:<6}{'100644':<8}{len(data):<10}`\n".encode() + data
        out += b"\n" if len(data) % 2 else b""
    return out


def test_prose_paragraphs_of_a_deb():
    pt = _load()
    deb = _deb({"./usr/share/doc/x/html/flow.html": PAGE,
                "./usr/share/doc/x/html/_modules/flow.html": "<p>" + "highlighted source code words " * 4 + "</p>",
                "./usr/share/doc/x/html/genindex.html": "<p>" + "an index page with many words " * 4 + "</p>"})
    first = "The boundary layer thickens downstream as viscous effects spread away from the wall surface."
    # Inline code is left out of a paragraph (not the paragraph); short ones, formulas, code blocks and
    # generated pages are dropped; pages keep their order and build() deduplicates.
    assert pt.deb_paragraphs(deb) == [
        first, "Call with the grid; the solver returns the velocity field on every node.", first]
    with pytest.raises(LeafkdError, match="not a .deb"):
        pt.deb_paragraphs(b"PK\x03\x04 a zip file")
    zst = _deb({}, ("data.tar.zst", b"\x28\xb5\x2f\xfd" + bytes(64)))  # newer Debian releases use zstd
    with pytest.raises(LeafkdError, match="cannot read the .deb's data.tar.zst"):
        pt.deb_paragraphs(zst)
    with pytest.raises(LeafkdError, match="malformed .deb"):
        pt.deb_paragraphs(deb[:8] + deb[8:56] + b"not-a-size" + deb[66:])


def test_build_checks_the_pinned_checksum_and_writes_atomically(tmp_path, monkeypatch, capsys):
    pt = _load()
    mirror = tmp_path / "mirror"
    deb = _deb({"./usr/share/doc/x/html/flow.html": PAGE})
    (mirror / "pool/main/x").mkdir(parents=True)
    (mirror / "pool/main/x/x-doc_1_all.deb").write_bytes(deb)
    monkeypatch.setattr(pt, "PACKAGES", [("pool/main/x/x-doc_1_all.deb", hashlib.sha256(deb).hexdigest())])
    target = pt.build(tmp_path / "out", mirror.as_uri())
    assert target.read_text().splitlines() == [
        "The boundary layer thickens downstream as viscous effects spread away from the wall surface.",
        "Call with the grid; the solver returns the velocity field on every node."]
    cached = tmp_path / "out" / "debs" / "x-doc_1_all.deb"
    assert cached.read_bytes() == deb  # cached for the next build
    cached.write_bytes(deb[:100])  # a damaged cache entry is fetched again, not reported as a changed archive
    assert pt.build(tmp_path / "out", mirror.as_uri()).read_text() == target.read_text()
    assert cached.read_bytes() == deb

    # A changed archive: one line naming the file and both checksums, exit non-zero, no output written.
    monkeypatch.setattr(pt, "PACKAGES", [("pool/main/x/x-doc_1_all.deb", "0" * 64)])
    monkeypatch.setattr(sys, "argv", ["package_text.py", "--out", str(tmp_path / "out2"), "--mirror", mirror.as_uri()])
    with pytest.raises(SystemExit) as exit_info:
        pt.main()
    message = str(exit_info.value.code)
    assert message.startswith("error: x-doc_1_all.deb: SHA-256 ") and "0" * 64 in message and "\n" not in message
    assert not (tmp_path / "out2" / "package-docs.txt").exists()

    # An --out that is a file: one line, the file untouched.
    (tmp_path / "afile").write_text("keep")
    monkeypatch.setattr(sys, "argv", ["package_text.py", "--out", str(tmp_path / "afile"), "--mirror", mirror.as_uri()])
    with pytest.raises(SystemExit) as exit_info:
        pt.main()
    assert str(exit_info.value.code) == f"error: {tmp_path / 'afile'}: exists and is not a folder (the output folder)"
    assert (tmp_path / "afile").read_text() == "keep"

    # An unreachable mirror: one line naming the URL.
    monkeypatch.setattr(sys, "argv", ["package_text.py", "--out", str(tmp_path / "out3"),
                                      "--mirror", (tmp_path / "nowhere").as_uri()])
    with pytest.raises(SystemExit) as exit_info:
        pt.main()
    message = str(exit_info.value.code)
    assert message.startswith("error: cannot download file://") and "--mirror https://snapshot.debian.org" in message

