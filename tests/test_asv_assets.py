"""Vendoring asv's CDN libraries: every URL asv's page loads maps to a local copy, unknown URLs are reported and
left alone, and the pages are rewritten from tarballs already in the cache (no network here)."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import asv
import pytest

from harness import asv_assets
from harness.asv_assets import ASSETS, Asset, VendorError, matches_integrity, rewrite_html

ASV_INDEX = Path(asv.__file__).parent / "www" / "index.html"  # the template `asv publish` copies

SAMPLE = """<html><head>
<script src="https://code.jquery.com/jquery-3.3.1.min.js" integrity="sha256-FgpCb/KJQlLNfOu91ta32o/NMZxltwRo8QtmkMRdAu8=" crossorigin="anonymous" onerror="js_load_failure()"></script>
<script src="https://cdnjs.cloudflare.com/ajax/libs/flot/0.8.3/jquery.flot.min.js" integrity="sha512-abc==" crossorigin="anonymous" referrerpolicy="no-referrer" onerror="js_load_failure()"></script>
<script src="https://cdn.example.org/unknown-1.0.js"></script>
<link rel="stylesheet" href="https://cdn.jsdelivr.net/npm/bootstrap@3.1.1/dist/css/bootstrap.min.css" integrity="sha256-x" crossorigin="anonymous">
<script src="asv.js"></script>
</head><body><a href="https://github.com/airspeed-velocity/asv/">asv</a></body></html>
"""  # noqa: E501


def test_mapped_cdn_urls_become_local_paths_without_cdn_attributes():
    html, unmapped = rewrite_html(SAMPLE)
    assert '<script src="vendor/jquery-3.3.1/dist/jquery.min.js" onerror="js_load_failure()"></script>' in html
    assert '<script src="vendor/flot-0.8.3/jquery.flot.js" onerror="js_load_failure()"></script>' in html
    assert '<link rel="stylesheet" href="vendor/bootstrap-3.1.1/dist/css/bootstrap.min.css">' in html
    assert "integrity" not in html and "crossorigin" not in html and "referrerpolicy" not in html
    assert unmapped == ["https://cdn.example.org/unknown-1.0.js"]


def test_unknown_urls_and_plain_links_are_left_as_they_are():
    html, _ = rewrite_html(SAMPLE)
    assert '<script src="https://cdn.example.org/unknown-1.0.js"></script>' in html
    assert '<a href="https://github.com/airspeed-velocity/asv/">' in html  # a link, not a loaded asset
    assert '<script src="asv.js"></script>' in html


def test_every_cdn_url_in_the_installed_asv_template_has_a_local_copy():
    html, unmapped = rewrite_html(ASV_INDEX.read_text())
    assert unmapped == []
    assert "https://" not in "".join(line for line in html.splitlines() if "<script" in line or "<link" in line)


def test_integrity_check_accepts_the_right_hash_and_rejects_another():
    assert matches_integrity(b"abc", "sha256-ungWv48Bz+pBQUDeXa4iI7ADYaOWF3qctBD/YfIAFa0=")
    assert not matches_integrity(b"abd", "sha256-ungWv48Bz+pBQUDeXa4iI7ADYaOWF3qctBD/YfIAFa0=")
    assert not matches_integrity(b"abc", "md5-whatever")


def _fake_tarball(path: Path, files: dict[str, bytes]) -> None:
    """An npm-style tarball (everything under package/) holding ``files``."""
    with tarfile.open(path, "w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(f"package/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_vendor_copies_cached_files_with_their_extra_folders_and_rewrites_pages(tmp_path, monkeypatch):
    css = Asset("bootstrap", "3.1.1", "dist/css/bootstrap.min.css", extra=("dist/fonts",))
    url = "https://cdn.jsdelivr.net/npm/bootstrap@3.1.1/dist/css/bootstrap.min.css"
    monkeypatch.setattr(asv_assets, "ASSETS", {url: css})
    cache, html_dir = tmp_path / "cache", tmp_path / "html"
    cache.mkdir()
    html_dir.mkdir()
    _fake_tarball(cache / "bootstrap-3.1.1.tgz", {css.path: b"body{}", "dist/fonts/g.woff": b"font",
                                                   "docs/x.css": b"not needed"})
    (html_dir / "index.html").write_text(f'<link rel="stylesheet" href="{url}">')
    monkeypatch.setattr(asv_assets.shutil, "which", lambda _: None)  # any npm call would fail
    assert asv_assets.vendor(html_dir, cache) == []
    root = html_dir / "vendor" / "bootstrap-3.1.1"
    assert (root / css.path).read_bytes() == b"body{}"
    assert (root / "dist/fonts/g.woff").read_bytes() == b"font"
    assert not (root / "docs").exists()
    assert (html_dir / "index.html").read_text() == f'<link rel="stylesheet" href="{css.local}">'


def test_vendor_names_a_file_missing_from_the_tarball(tmp_path):
    asset = Asset("flot", "0.8.3", "jquery.flot.js")
    _fake_tarball(tmp_path / "flot-0.8.3.tgz", {"jquery.js": b""})
    with pytest.raises(VendorError, match="flot-0.8.3.tgz has no jquery.flot.js"):
        asv_assets.unpack(asset, tmp_path / "flot-0.8.3.tgz", tmp_path / "html")


def test_missing_npm_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(asv_assets.shutil, "which", lambda _: None)
    with pytest.raises(VendorError, match="npm is not installed"):
        asv_assets.fetch(next(iter(ASSETS.values())), tmp_path)


def test_main_reports_an_empty_html_dir_in_one_line(tmp_path, capsys):
    assert asv_assets.main(["vendor", "--html-dir", str(tmp_path)]) == 1
    assert capsys.readouterr().err.strip() == f"asv_assets: no *.html in {tmp_path} (run `asv publish` first)"
