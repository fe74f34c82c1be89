"""The official MCP Python SDK against `hangar serve --stdio` (the desktop front door)."""

from __future__ import annotations

import tempfile
from contextlib import asynccontextmanager

import anyio
import pytest

import mcp.types as types
from mcp import ClientSession
from mcp.client.stdio import stdio_client
from helpers import HANDSHAKE_REVISIONS, text, tool_names
from conftest import TIMEOUT_S

pytestmark = pytest.mark.anyio


@asynccontextmanager
async def stdio_session(params, **callbacks):
    # The node logs to stderr; keep it out of pytest's output but available on failure.
    with tempfile.TemporaryFile("w+") as errlog:
        try:
            async with stdio_client(params, errlog=errlog) as (read, write):
                async with ClientSession(read, write, **callbacks) as session:
                    await session.initialize()
                    yield session
        except BaseException:
            errlog.seek(0)
            print("hangar --stdio stderr:\n" + errlog.read()[-4000:])
            raise


async def test_stdio_front_door_lists_and_calls(stdio_server_params):
    with anyio.fail_after(TIMEOUT_S * 2):
        async with stdio_session(stdio_server_params) as s:
            assert s.protocol_version in HANDSHAKE_REVISIONS
            names = tool_names(await s.list_tools())
            for want in ("fixture__echo", "everything__echo", "time__get_current_time"):
                assert want in names, f"{want} missing from {names}"
            assert text(await s.call_tool("everything__echo", {"message": "via stdio"})) == "Echo: via stdio"
            assert text(await s.call_tool("fixture__add", {"a": 2, "b": 3})) == "5"
            r = await s.call_tool("time__get_current_time", {"timezone": "UTC"})
            assert '"timezone": "UTC"' in text(r) or '"timezone":"UTC"' in text(r)


async def test_stdio_front_door_relays_progress_and_sampling(stdio_server_params):
    seen: list[float] = []

    async def on_progress(progress, total, message):
        seen.append(progress)

    async def sample(context, params):
        return types.CreateMessageResult(
            role="assistant", content=types.TextContent(type="text", text="stdio-42"), model="python-test"
        )

    with anyio.fail_after(TIMEOUT_S * 2):
        async with stdio_session(stdio_server_params, sampling_callback=sample) as s:
            r = await s.call_tool("fixture__progress", {"steps": 2, "ms": 20}, progress_callback=on_progress)
            assert text(r) == "done 2"
            assert seen == [1, 2], seen
            assert text(await s.call_tool("fixture__sample", {"prompt": "q"})) == "sampled: stdio-42"


async def test_stdio_front_door_serves_resources_and_prompts(stdio_server_params):
    with anyio.fail_after(TIMEOUT_S * 2):
        async with stdio_session(stdio_server_params) as s:
            uris = [str(r.uri) for r in (await s.list_resources()).resources]
            assert "fixture://fixture/readme" in uris
            readme = await s.read_resource("fixture://fixture/readme")
            assert readme.contents[0].text == "readme of fixture"
            greet = await s.get_prompt("fixture__greet", {"who": "Stdio"})
            assert greet.messages[0].content.text == "Hello, Stdio!"
