#!/usr/bin/env bash
# THE test command: ./scripts/test.sh   (CI runs it through .ci/run)
#
# In order: the test peers (scripts/deps.sh), cargo fmt --check, clippy -D warnings, the build
# of every binary, cargo nextest (unit + end-to-end tests; settings in .config/nextest.toml),
# the Python SDK suite (pytest tests/python, the official `mcp` client against real nodes), and
# the MCP conformance comparison (scripts/conformance.sh: the fixture directly vs. through
# hangar's /servers/<id>/mcp). A failing set-up stage (deps, fmt, clippy, build) stops the run;
# the three test suites all run. Exits non-zero if anything failed; the last line is
# "N passed, M failed" over all suites.
set -uo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/hangar/target}"
export HANGAR_DEPS="${HANGAR_DEPS:-$HOME/.cache/hangar/deps}"
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"
export PYTHONDONTWRITEBYTECODE=1  # no __pycache__ in the repository
export HANGAR_BIN="${HANGAR_BIN:-$CARGO_TARGET_DIR/debug/hangar}"
export HANGAR_FIXTURE_BIN="${HANGAR_FIXTURE_BIN:-$CARGO_TARGET_DIR/debug/hangar-fixture}"

WORK="$(mktemp -d "${TMPDIR:-/tmp}/hangar-test.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT

START=$SECONDS
# Tests write only to temporary directories: remember what the repository holds (ignored
# files included) so the summary can name anything a test left behind.
untracked() { git -C "$ROOT" status --porcelain --ignored --untracked-files=all 2>/dev/null | grep -E '^(\?\?|!!) ' | sort; }
UNTRACKED_BEFORE="$(untracked)"
PASSED=0
FAILED=0
FAILURES=()
RESULTS=()

stage() {
    echo
    echo "== $* ($((SECONDS - START)) s)"
}
finish() {
    echo
    echo "== summary ($((SECONDS - START)) s)"
    local r
    for r in "${RESULTS[@]}"; do echo "   $r"; done
    for r in "${FAILURES[@]}"; do echo "   FAILED: $r"; done
    echo "$PASSED passed, $FAILED failed"
    ((${#FAILURES[@]} == 0))
    exit
}
# A set-up stage failed: say why and stop.
abort() {
    FAILURES+=("$*")
    echo "test.sh: FAILED: $*" >&2
    finish
}
# The number before WORD in a summary line ("12 passed, 1 failed"), 0 if absent.
count_of() { grep -oE "[0-9]+ $2" <<<"$1" | tail -1 | grep -oE '^[0-9]+' || echo 0; }
# suite_result NAME RC LINE: add the counts of LINE, record a failure if RC != 0 or none ran.
suite_result() {
    local name="$1" rc="$2" line="$3"
    local p f
    p=$(count_of "$line" passed)
    f=$(($(count_of "$line" failed) + $(count_of "$line" "timed out") + $(count_of "$line" error)))
    PASSED=$((PASSED + p))
    FAILED=$((FAILED + f))
    RESULTS+=("$name: ${line:-no summary} (exit $rc)")
    if ((rc != 0 || p == 0)); then
        ((f > 0)) || FAILED=$((FAILED + 1))
        FAILURES+=("$name: ${line:-no summary} (exit $rc)")
        echo "test.sh: FAILED: $name (exit $rc)" >&2
    fi
}

# ---------------------------------------------------------------- set-up stages
stage "deps: scripts/deps.sh → $HANGAR_DEPS"
"$ROOT/scripts/deps.sh" || abort "deps: scripts/deps.sh failed (see its message above)"

stage "cargo fmt --all -- --check"
cargo fmt --all -- --check || abort "fmt: run 'cargo fmt --all' and commit the result"

stage "cargo clippy --workspace --all-targets -- -D warnings"
cargo clippy --workspace --all-targets -- -D warnings || abort "clippy: fix the warnings above"

# --all-targets (not --bins): the same feature set as clippy and nextest, so the C++ of RocksDB
# is compiled once per cold cache instead of twice (≈ 10 min each on 2 cores).
stage "cargo build --workspace --all-targets (binaries for the end-to-end tests, and the tests)"
cargo build --workspace --all-targets || abort "build: the workspace does not build"
for b in "$HANGAR_BIN" "$HANGAR_FIXTURE_BIN"; do
    [ -x "$b" ] || abort "build: expected binary $b is missing"
done

# ---------------------------------------------------------------- cargo nextest
stage "cargo nextest run --workspace"
cargo nextest run --workspace 2>&1 | tee "$WORK/nextest.log"
rc=${PIPESTATUS[0]}
suite_result "nextest" "$rc" "$(grep -E '^ *Summary \[' "$WORK/nextest.log" | tail -1 | sed 's/^ *//')"

# ---------------------------------------------------------------- pytest
stage "pytest tests/python (the official mcp Python SDK as client)"
"$HANGAR_DEPS/venv/bin/python" -m pytest tests/python -q -p no:cacheprovider 2>&1 | tee "$WORK/pytest.log"
rc=${PIPESTATUS[0]}
suite_result "pytest" "$rc" "$(grep -E '[0-9]+ (passed|failed|errors?)' "$WORK/pytest.log" | tail -1)"

# ---------------------------------------------------------------- conformance
stage "MCP conformance: the fixture directly vs. through hangar (scripts/conformance.sh)"
"$ROOT/scripts/conformance.sh" 2>&1 | tee "$WORK/conformance.log"
rc=${PIPESTATUS[0]}
suite_result "conformance" "$rc" "$(grep -E '^conformance: [0-9]+ passed' "$WORK/conformance.log" | tail -1)"
RESULTS+=("$(grep -E 'scenarios pass directly' "$WORK/conformance.log" | tail -1)")

# ---------------------------------------------------------------- nothing left behind
stage "the repository holds no files the tests left behind"
left="$(comm -13 <(echo "$UNTRACKED_BEFORE") <(untracked))"
if [ -n "$left" ]; then
    echo "$left"
    suite_result "clean-tree" 1 "0 passed, 1 failed"
else
    echo "clean"
    suite_result "clean-tree" 0 "1 passed, 0 failed"
fi

finish
