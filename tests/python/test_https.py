"""The official MCP Python SDK over HTTPS (`server.tls`), trusting the node's private CA."""

from __future__ import annotations

import json
import os
import ssl
import subprocess
from pathlib import Path

import anyio
import httpx2
import pytest
from mcp import ClientSession
from mcp.client.streamable_http import streamable_http_client

from conftest import FIXTURE_BIN, TARGET, TIMEOUT_S, _start, require
from helpers import text

pytestmark = pytest.mark.anyio

CTL_BIN = Path(os.environ.get("HANGARCTL_BIN") or TARGET / "debug/hangarctl")


@pytest.fixture(scope="module")
def hangar_https(tmp_path_factory):
    """A node serving HTTPS with a certificate of `hangarctl cluster gen-certs`: (base URL, CA file)."""
    require(CTL_BIN, "run `cargo build --workspace --bins` first (or set HANGARCTL_BIN)")
    require(FIXTURE_BIN, "run `cargo build --workspace --bins` first (or set HANGAR_FIXTURE_BIN)")
    d = tmp_path_factory.mktemp("hangar-https")
    certs = d / "certs"
    subprocess.run(
        [str(CTL_BIN), "cluster", "gen-certs", "--out", str(certs), "--nodes", "1", "--san", "127.0.0.1",
         "--server-name", "localhost"],
        check=True, capture_output=True,
    )
    config = json.dumps({
        "server": {"tls": {"cert_file": str(certs / "node-1.pem"), "key_file": str(certs / "node-1-key.pem")}},
        "mcp_servers": {"fixture": {"mode": "subprocess", "command": [str(FIXTURE_BIN), "stdio"]}},
    })
    for _node in _start(d, config):
        yield json.loads((d / "ready.json").read_text())["url"], certs / "ca.pem"


async def test_initialize_and_call_over_https_trusting_the_ca(hangar_https):
    url, ca = hangar_https
    assert url.startswith("https://")
    with anyio.fail_after(TIMEOUT_S):
        # Without the CA the certificate is refused.
        async with httpx2.AsyncClient() as plain:
            with pytest.raises(httpx2.ConnectError):
                await plain.get(f"{url}/health/live")
        async with httpx2.AsyncClient(verify=ssl.create_default_context(cafile=str(ca)), timeout=TIMEOUT_S) as http:
            async with streamable_http_client(f"{url}/mcp", http_client=http) as (read, write):
                async with ClientSession(read, write) as s:
                    init = await s.initialize()
                    r = await s.call_tool("fixture__echo", {"message": "over https"})
    assert init.server_info.name == "mcp-hangar"
    assert text(r) == "over https"
