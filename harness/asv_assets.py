"""Make asv's published dashboard work offline: its CDN libraries, fetched from npm, served next to it.

asv 0.6.6's pages (``asv publish`` -> reports/out/asv) load jQuery, flot and friends from three CDNs;
a machine that cannot reach them shows a blank graph. ``python -m harness.asv_assets vendor`` fetches
the same library versions from the npm registry with ``npm pack`` (cached in .asv/vendor/), copies
the files the pages use to ``<html-dir>/vendor/<package>-<version>/``, and points the pages' CDN URLs
at those copies. A CDN URL with no local copy is named in one line and left as it is.

stupidtable 1.0.1 (cdnjs) was never published to npm; ``stupid-table-plugin`` 1.1.3, the same plugin
by the same author and the only version npm holds, stands in for it (same ``$.fn.stupidtable`` API).
flot 0.8.3 ships only unminified files on npm, so those replace the CDN's ``.min.js``.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import re
import shutil
import subprocess
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CACHE_DIR = ROOT / ".asv" / "vendor"  # .asv/ is git-ignored
HTML_DIR = ROOT / "reports" / "out" / "asv"  # asv.conf.json's html_dir
VENDOR_SUBDIR = "vendor"


@dataclass(frozen=True)
class Asset:
    """One file of an npm package that stands in for a CDN URL; ``extra`` are folders it needs beside it."""

    package: str
    version: str
    path: str  # inside the package tarball, below "package/"
    extra: tuple[str, ...] = ()

    @property
    def spec(self) -> str:
        """The ``npm pack`` argument: ``name@version``."""
        return f"{self.package}@{self.version}"

    @property
    def local(self) -> str:
        """Where the file lives relative to the html folder (a URL path, always with '/')."""
        return f"{VENDOR_SUBDIR}/{self.package}-{self.version}/{self.path}"


CDNJS = "https://cdnjs.cloudflare.com/ajax/libs"
JSDELIVR = "https://cdn.jsdelivr.net/npm"
# Every CDN URL asv 0.6.6 writes into index.html / error.html, and its npm stand-in.
ASSETS: dict[str, Asset] = {
    "https://code.jquery.com/jquery-3.3.1.min.js": Asset("jquery", "3.3.1", "dist/jquery.min.js"),
    f"{CDNJS}/flot/0.8.3/jquery.flot.min.js": Asset("flot", "0.8.3", "jquery.flot.js"),
    f"{CDNJS}/flot/0.8.3/jquery.flot.time.min.js": Asset("flot", "0.8.3", "jquery.flot.time.js"),
    f"{CDNJS}/flot/0.8.3/jquery.flot.selection.min.js": Asset("flot", "0.8.3", "jquery.flot.selection.js"),
    f"{CDNJS}/flot/0.8.3/jquery.flot.categories.min.js": Asset("flot", "0.8.3", "jquery.flot.categories.js"),
    f"{JSDELIVR}/flot-orderbars@1.0.0/js/jquery.flot.orderBars.js":
        Asset("flot-orderbars", "1.0.0", "js/jquery.flot.orderBars.js"),
    f"{CDNJS}/stupidtable/1.0.1/stupidtable.min.js": Asset("stupid-table-plugin", "1.1.3", "stupidtable.min.js"),
    f"{CDNJS}/blueimp-md5/2.19.0/js/md5.min.js": Asset("blueimp-md5", "2.19.0", "js/md5.min.js"),
    f"{JSDELIVR}/bootstrap@3.1.1/dist/js/bootstrap.min.js": Asset("bootstrap", "3.1.1", "dist/js/bootstrap.min.js"),
    # bootstrap.min.css loads its glyph font from ../fonts/
    f"{JSDELIVR}/bootstrap@3.1.1/dist/css/bootstrap.min.css":
        Asset("bootstrap", "3.1.1", "dist/css/bootstrap.min.css", extra=("dist/fonts",)),
}

# A <script src=...> or <link href=...> tag loading an absolute http(s) URL.
_REMOTE_TAG = re.compile(r"""<(?:script|link)\b[^>]*?\b(?:src|href)=["'](https?://[^"']+)["'][^>]*>""", re.I)
# Attributes that only make sense for the CDN copy: a hash of its bytes, CORS mode, referrer policy.
_CDN_ATTRS = re.compile(r"""\s+(?:integrity|crossorigin|referrerpolicy)(?:=(?:"[^"]*"|'[^']*'|[^\s>]+))?""", re.I)


class VendorError(RuntimeError):
    """A library could not be fetched or unpacked; the message is one sentence for the user."""


def rewrite_html(html: str, assets: dict[str, Asset] = ASSETS) -> tuple[str, list[str]]:
    """``html`` with each mapped CDN URL in a script/link tag replaced by its local path.

    The rewritten tags lose ``integrity``/``crossorigin``/``referrerpolicy`` (the local copy is
    served from the same origin, and flot's npm files are not the CDN's minified bytes). Returns the
    new html and the remote URLs that have no mapping, which are left as they are.
    """
    unmapped: list[str] = []

    def local(match: re.Match[str]) -> str:
        url = match.group(1)
        asset = assets.get(url)
        if asset is None:
            unmapped.append(url)
            return match.group(0)
        return _CDN_ATTRS.sub("", match.group(0).replace(url, asset.local))

    return _REMOTE_TAG.sub(local, html), unmapped


def fetch(asset: Asset, cache_dir: Path = CACHE_DIR) -> Path:
    """The npm tarball of ``asset``'s package in ``cache_dir``, fetched with ``npm pack`` if not there yet."""
    tarball = cache_dir / f"{asset.package}-{asset.version}.tgz"
    if tarball.is_file():
        return tarball
    npm = shutil.which("npm")
    if npm is None:
        raise VendorError("asv_assets: npm is not installed (e.g. `apt-get install -y npm`); cannot fetch the "
                          "dashboard's libraries")
    cache_dir.mkdir(parents=True, exist_ok=True)
    done = subprocess.run([npm, "pack", asset.spec, "--loglevel=error"], cwd=cache_dir, capture_output=True,
                          text=True, timeout=300)
    if done.returncode != 0 or not tarball.is_file():
        # npm's first error line after "code E...": "404 Not Found - GET ..." or "notarget No matching version ..."
        errors = [line.removeprefix("npm error").strip() for line in done.stderr.splitlines()
                  if line.startswith("npm error") and not line.startswith("npm error code")]
        raise VendorError(f"asv_assets: cannot fetch {asset.spec} from the npm registry: "
                          f"{errors[0] if errors else f'npm pack exited with {done.returncode}'}")
    return tarball


def unpack(asset: Asset, tarball: Path, html_dir: Path) -> Path:
    """Copy ``asset.path`` and its ``extra`` folders from ``tarball`` to ``html_dir``; returns the file's copy."""
    dest_root = html_dir / VENDOR_SUBDIR / f"{asset.package}-{asset.version}"
    wanted = (asset.path, *(f"{folder.rstrip('/')}/" for folder in asset.extra))
    with tarfile.open(tarball) as tar:
        members = [m for m in tar.getmembers() if m.isfile() and m.name.startswith("package/")]
        picked = [m for m in members if any(m.name[len("package/"):] == w or
                                            (w.endswith("/") and m.name[len("package/"):].startswith(w))
                                            for w in wanted)]
        if not any(m.name == f"package/{asset.path}" for m in picked):
            raise VendorError(f"asv_assets: {tarball.name} has no {asset.path} (needed for {asset.spec})")
        for member in picked:
            target = dest_root / member.name[len("package/"):]
            target.parent.mkdir(parents=True, exist_ok=True)
            source = tar.extractfile(member)
            assert source is not None  # a regular file always has a payload
            target.write_bytes(source.read())
    return dest_root / asset.path


def matches_integrity(data: bytes, integrity: str) -> bool:
    """True when ``data`` has the hash a subresource-integrity value (``sha256-<base64>`` ...) names."""
    algorithm, _, digest = integrity.partition("-")
    if algorithm not in ("sha256", "sha384", "sha512"):
        return False
    return base64.b64encode(hashlib.new(algorithm, data).digest()).decode() == digest


def vendor(html_dir: Path = HTML_DIR, cache_dir: Path = CACHE_DIR) -> list[str]:
    """Fetch every library the pages in ``html_dir`` load from a CDN and point the pages at local copies.

    Prints one line per library copied (saying whether its bytes equal the CDN's, by the page's
    integrity hash) and one per URL left remote. Returns the unmapped URLs.
    """
    pages = sorted(html_dir.glob("*.html"))
    if not pages:
        raise VendorError(f"asv_assets: no *.html in {html_dir} (run `asv publish` first)")
    texts = {page: page.read_text() for page in pages}
    integrity = {m.group(1): m.group(2) for text in texts.values()
                 for m in re.finditer(r"""["'](https?://[^"']+)["'][^>]*\bintegrity=["']([^"']+)["']""", text)}
    used = {m.group(1) for text in texts.values() for m in _REMOTE_TAG.finditer(text)}
    for url in sorted(used & ASSETS.keys()):
        asset = ASSETS[url]
        copy = unpack(asset, fetch(asset, cache_dir), html_dir)
        same = url in integrity and matches_integrity(copy.read_bytes(), integrity[url])
        print(f"asv_assets: {asset.spec} {asset.path} -> {asset.local} "
              f"({'same bytes as the CDN' if same else 'npm copy, not the CDN bytes'})")
    unmapped: list[str] = []
    for page, text in texts.items():
        new, missing = rewrite_html(text)
        for url in missing:
            print(f"asv_assets: no local copy for {url} in {page.name}; left as is")
        unmapped += missing
        if new != text:
            page.write_text(new)
    return unmapped


def main(argv: list[str] | None = None) -> int:
    """``python -m harness.asv_assets vendor [--html-dir DIR]``: make asv's published pages work offline."""
    parser = argparse.ArgumentParser(
        prog="python -m harness.asv_assets",
        description="Fetch the JavaScript/CSS libraries asv's dashboard loads from CDNs (same versions, from "
                    "the npm registry via `npm pack`, cached in .asv/vendor/), copy them next to the published "
                    "pages, and rewrite the pages' CDN URLs to those copies, so the dashboard works offline. "
                    "Run after `asv publish`.")
    sub = parser.add_subparsers(dest="command", required=True)
    cmd = sub.add_parser("vendor", help="vendor the libraries into the published dashboard")
    cmd.add_argument("--html-dir", type=Path, default=HTML_DIR,
                     help=f"asv's html_dir (default: {HTML_DIR.relative_to(ROOT)})")
    cmd.add_argument("--cache-dir", type=Path, default=CACHE_DIR,
                     help=f"where npm tarballs are kept (default: {CACHE_DIR.relative_to(ROOT)})")
    args = parser.parse_args(argv)
    try:
        vendor(args.html_dir, args.cache_dir)
    except (VendorError, OSError, subprocess.SubprocessError, tarfile.TarError) as error:
        print(error if isinstance(error, VendorError) else f"asv_assets: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
