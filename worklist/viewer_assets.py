"""Where the study page's built viewer is: ``viewer.bundle.js`` (Cornerstone3D + worklist/viewer/viewer.js, bundled
with esbuild by scripts/bootstrap.sh) in ``.cache/viewer/<key>/`` of the checkout, outside git.

The key is the hash of what the bundle is built from (the committed package-lock.json, package.json, viewer.js
and xmlbuilder2-unused.js), so an edit of any of them asks for a new build and the worklist never serves a stale one.
scripts/bootstrap.sh computes the same key (``viewer_key`` there): keep the two in step. ``RADDRAFT_VIEWER_DIR``
names another folder holding a built bundle (an installation without the checkout's .cache).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

SOURCE_DIR = Path(__file__).parent / "viewer"
# in this order, as bootstrap.sh hashes them
SOURCES = ("package-lock.json", "package.json", "viewer.js", "xmlbuilder2-unused.js")
CACHE_ROOT = Path(__file__).resolve().parent.parent / ".cache" / "viewer"
BUNDLE = "viewer.bundle.js"
KEY_LENGTH = 16


def bundle_key() -> str:
    digest = hashlib.sha256()
    for name in SOURCES:
        digest.update((SOURCE_DIR / name).read_bytes())
    return digest.hexdigest()[:KEY_LENGTH]


def bundle_dir() -> Path:
    """The folder the built viewer is served from (it may not exist: then the page says how to build it)."""
    return CACHE_ROOT / bundle_key()


def asset(name: str) -> Path | None:
    """The built file *name* (the bundle, a worker or wasm file esbuild wrote beside it), or None."""
    if "/" in name or "\\" in name or name.startswith("."):
        return None
    path = bundle_dir() / name
    return path if path.is_file() else None
