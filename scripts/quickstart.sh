#!/usr/bin/env bash
# Build Hangar and run one node on examples/quickstart.yaml, fronting two real MCP servers
# (the fixture server as a child process, and the same server as a remote HTTP service).
# Ctrl-C stops everything.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/hangar/target}"
cargo build --release -p hangar-node -p hangar-fixture -p hangarctl
BIN="$CARGO_TARGET_DIR/release"
export HANGAR_FIXTURE_BIN="$BIN/hangar-fixture"

work="$(mktemp -d)"
cleanup() { [ -n "${fixture_pid:-}" ] && kill "$fixture_pid" 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT INT TERM

"$HANGAR_FIXTURE_BIN" http --listen 127.0.0.1:0 --name remote --ready-file "$work/fixture.url" >"$work/fixture.log" 2>&1 &
fixture_pid=$!
for _ in $(seq 1 100); do [ -s "$work/fixture.url" ] && break; sleep 0.1; done
[ -s "$work/fixture.url" ] || { echo "fixture HTTP server did not start:"; cat "$work/fixture.log"; exit 1; }
export FIXTURE_HTTP_URL="$(cat "$work/fixture.url")"

echo "Hangar on http://${HANGAR_LISTEN_ADDR:-127.0.0.1:8000}  (MCP at /mcp, REST at /api/, metrics at /metrics)"
"$BIN/hangar" serve --config examples/quickstart.yaml
