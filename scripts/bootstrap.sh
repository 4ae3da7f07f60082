#!/usr/bin/env bash
# Installs everything raddraft needs on a Debian machine: the system packages (dcmtk, Orthanc, validators,
# Redis, Chromium, Orthanc's DICOMweb plugin), the Python virtual environment in .venv with torch pinned to the
# CPU build, the OHIF viewer's static build (tests/test_ohif_sr.py) in .cache/ohif and the worklist viewer's bundle
# (Cornerstone3D) in .cache/viewer, outside git.
# Idempotent and quiet when nothing changed; safe to run before every command.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { echo "[bootstrap] $*" >&2; }

apt_packages=(dcmtk orthanc orthanc-dicomweb dicom3tools pixelmed-apps redis-server chromium openjdk-17-jdk-headless)
missing=()
for pkg in "${apt_packages[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    log "installing system packages: ${missing[*]}"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

PYTHON="${RADDRAFT_PYTHON:-}"
if [ -z "$PYTHON" ]; then
    for candidate in python3.11 python3; do
        if command -v "$candidate" >/dev/null && "$candidate" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
            PYTHON="$candidate"; break
        fi
    done
fi
[ -n "$PYTHON" ] || { log "Python 3.11 is required (the pinned CPU torch wheel is built for it)"; exit 1; }

stamp=".venv/.raddraft-installed"
want="$(cat pyproject.toml constraints.txt | sha256sum | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    log "creating the virtual environment in .venv"
    [ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
    pip_args=(-q --disable-pip-version-check -c constraints.txt)
    [ -d /opt/wheels ] && pip_args+=(--find-links /opt/wheels)
    if ! .venv/bin/python -m pip install "${pip_args[@]}" -e ".[dev]" >.venv/pip-install.log 2>&1; then
        grep -v "is ignored: it is neither" .venv/pip-install.log >&2
        log "pip install failed (full log: .venv/pip-install.log)"; exit 1
    fi
    echo "$want" > "$stamp"
fi

# The OHIF viewer's prebuilt dist/ (npm package @ohif/app ships it), for the browser test of the findings SR in
# OHIF. Unpacked from the package tarball: no node_modules, no install scripts. Never committed (.gitignore).
OHIF_VERSION="${RADDRAFT_OHIF_VERSION:-3.13.2}"
ohif_dir=".cache/ohif/$OHIF_VERSION"
if [ ! -f "$ohif_dir/dist/index.html" ]; then
    command -v npm >/dev/null || { log "npm is required to fetch the OHIF viewer (@ohif/app@$OHIF_VERSION)"; exit 1; }
    log "fetching the OHIF viewer @ohif/app@$OHIF_VERSION into $ohif_dir"
    tmp="$(mktemp -d)"
    trap 'rm -rf "$tmp"' EXIT
    (cd "$tmp" && npm pack --silent "@ohif/app@$OHIF_VERSION" >/dev/null)
    mkdir -p "$tmp/unpacked"
    tar -xzf "$tmp"/ohif-app-*.tgz -C "$tmp/unpacked" package/dist
    rm -rf "$ohif_dir"
    mkdir -p "$ohif_dir"
    mv "$tmp/unpacked/package/dist" "$ohif_dir/dist"
fi

# The worklist's study viewer: Cornerstone3D (@cornerstonejs/core, @cornerstonejs/tools) and esbuild at the versions
# of worklist/viewer/package-lock.json, bundled with worklist/viewer/viewer.js into one viewer.bundle.js that the
# worklist serves (/static/viewer/): no CDN at run time. Built in .cache/viewer/<key>/, outside git; the key hashes
# the lockfile, package.json, viewer.js and the xmlbuilder2 stand-in (worklist/viewer_assets.py computes the same), so
# the step is skipped while the bundle of those files exists. xmlbuilder2 (vtk.js's XML reader/writer, which need
# Node's events and url modules) is replaced by worklist/viewer/xmlbuilder2-unused.js: the viewer reads no VTK XML.
viewer_src="worklist/viewer"
viewer_files=(package-lock.json package.json viewer.js xmlbuilder2-unused.js)
viewer_key="$(cd "$viewer_src" && cat "${viewer_files[@]}" | sha256sum | cut -c1-16)"
viewer_dir=".cache/viewer/$viewer_key"
if [ ! -f "$viewer_dir/viewer.bundle.js" ]; then
    command -v npm >/dev/null || { log "npm is required to build the worklist viewer (Cornerstone3D)"; exit 1; }
    log "building the worklist viewer (Cornerstone3D, esbuild) into $viewer_dir"
    viewer_tmp="$(mktemp -d)"
    trap 'rm -rf "${tmp:-}" "$viewer_tmp"' EXIT
    (cd "$viewer_src" && cp "${viewer_files[@]}" "$viewer_tmp/")
    if ! (cd "$viewer_tmp" && npm ci --ignore-scripts --no-audit --no-fund --loglevel=error >npm.log 2>&1 \
            && node_modules/.bin/esbuild viewer.js --bundle --format=iife --minify --target=es2020 \
               --alias:xmlbuilder2=./xmlbuilder2-unused.js --outdir=dist --entry-names=viewer.bundle --log-level=error \
               >esbuild.log 2>&1); then
        cat "$viewer_tmp"/npm.log "$viewer_tmp"/esbuild.log >&2 2>/dev/null || true
        log "building the worklist viewer failed"; exit 1
    fi
    mkdir -p .cache/viewer
    rm -rf "$viewer_dir"
    mv "$viewer_tmp/dist" "$viewer_dir"
    # the bundles of earlier sources are never served again
    find .cache/viewer -mindepth 1 -maxdepth 1 -type d ! -name "$viewer_key" -exec rm -rf {} +
fi
