"""The official MCP Python SDK against hangar's Streamable HTTP front door (`/mcp`)."""

from __future__ import annotations

import anyio
import pytest

import mcp.types as types
from helpers import HANDSHAKE_REVISIONS, as_json, http_session, text, tool_names
from conftest import TIMEOUT_S

pytestmark = pytest.mark.anyio


async def test_initialize(hangar):
    with anyio.fail_after(TIMEOUT_S):
        async with http_session(hangar.mcp_url, initialize=False) as s:
            init = await s.initialize()
    assert init.server_info.name == "mcp-hangar"
    assert init.protocol_version in HANDSHAKE_REVISIONS
    assert init.capabilities.tools is not None


async def test_tools_of_all_three_servers_are_listed_with_prefixes(hangar):
    with anyio.fail_after(TIMEOUT_S):
        async with http_session(hangar.mcp_url) as s:
            names = tool_names(await s.list_tools())
    for want in ("fixture__echo", "fixture__progress", "everything__echo", "everything__get-sum",
                 "time__get_current_time", "time__convert_time"):
        assert want in names, f"{want} missing from {names}"
    upstream = [n for n in names if not n.startswith("hangar_")]
    assert all(n.split("__", 1)[0] in {"fixture", "everything", "time"} for n in upstream), upstream
    assert all(len(n) <= 64 for n in names)


async def test_call_server_everything_echo(hangar):
    with anyio.fail_after(TIMEOUT_S):
        async with http_session(hangar.mcp_url) as s:
            r = await s.call_tool("everything__echo", {"message": "hello from python"})
    assert text(r) == "Echo: hello from python"


async def test_call_everything_get_sum_structured(hangar):
    with anyio.fail_after(TIMEOUT_S):
        async with http_session(hangar.mcp_url) as s:
            r = await s.call_tool("everything__get-sum", {"a": 19, "b": 23})
    assert "42" in text(r)


async def test_call_mcp_server_time(hangar):
    with anyio.fail_after(TIMEOUT_S):
        async with http_session(hangar.mcp_url) as s:
            r = await s.call_tool("time__get_current_time", {"timezone": "UTC"})
    got = as_json(text(r))
    assert got["timezone"] == "UTC"
    assert got["datetime"][:2] == "20", got


async def test_progress_notifications_reach_the_callback(hangar):
    seen: list[tuple[float, float | None, str | None]] = []

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        seen.append((progress, total, message))

    with anyio.fail_after(TIMEOUT_S):
        async with http_session(hangar.mcp_url) as s:
            r = await s.call_tool("fixture__progress", {"steps": 3, "ms": 20}, progress_callback=on_progress)
    assert text(r) == "done 3"
    assert [p for p, _, _ in seen] == [1, 2, 3], seen
    assert all(t == 3 for _, t, _ in seen), seen


async def test_sampling_is_relayed_to_the_client(hangar):
    prompts: list[str] = []

    async def sample(context, params: types.CreateMessageRequestParams):
        block = params.messages[0].content
        prompts.append(getattr(block, "text", ""))
        return types.CreateMessageResult(
            role="assistant", content=types.TextContent(type="text", text="42"), model="python-test"
        )

    with anyio.fail_after(TIMEOUT_S):
        async with http_session(hangar.mcp_url, sampling_callback=sample) as s:
            r = await s.call_tool("fixture__sample", {"prompt": "what is 6*7?"})
    assert prompts == ["what is 6*7?"]
    assert text(r) == "sampled: 42"


async def test_sampling_from_server_everything_is_relayed(hangar):
    calls = 0

    async def sample(context, params: types.CreateMessageRequestParams):
        nonlocal calls
        calls += 1
        return types.CreateMessageResult(
            role="assistant", content=types.TextContent(type="text", text="relayed-answer"), model="python-test"
        )

    with anyio.fail_after(TIMEOUT_S):
        async with http_session(hangar.mcp_url, sampling_callback=sample) as s:
            r = await s.call_tool("everything__trigger-sampling-request", {"prompt": "hi", "maxTokens": 10})
    assert calls == 1
    assert "relayed-answer" in text(r)


async def test_elicitation_is_relayed_to_the_client(hangar):
    async def elicit(context, params):
        assert params.message == "proceed?"
        return types.ElicitResult(action="accept", content={"answer": "yes-please"})

    with anyio.fail_after(TIMEOUT_S):
        async with http_session(hangar.mcp_url, elicitation_callback=elicit) as s:
            r = await s.call_tool("fixture__elicit", {"message": "proceed?"})
    got = as_json(text(r))
    assert got["action"] == "accept" and got["content"] == {"answer": "yes-please"}, got


async def test_roots_are_relayed_to_the_client(hangar):
    async def roots(context):
        return types.ListRootsResult(roots=[types.Root(uri="file:///tmp/py-root", name="py")])

    with anyio.fail_after(TIMEOUT_S):
        async with http_session(hangar.mcp_url, list_roots_callback=roots) as s:
            r = await s.call_tool("fixture__roots", {})
    assert "file:///tmp/py-root" in text(r)


async def test_resources_are_listed_and_read_through_mcp(hangar):
    with anyio.fail_after(TIMEOUT_S):
        async with http_session(hangar.mcp_url) as s:
            listing = await s.list_resources()
            uris = [str(r.uri) for r in listing.resources]
            assert "fixture://fixture/readme" in uris, uris
            demo = [u for u in uris if u.startswith("demo://")]
            assert demo, f"no server-everything resource in {uris}"
            readme = await s.read_resource("fixture://fixture/readme")
            doc = await s.read_resource(demo[0])
    assert readme.contents[0].text == "readme of fixture"
    assert doc.contents and str(doc.contents[0].uri) == demo[0]


async def test_prompts_are_listed_and_fetched_through_mcp(hangar):
    with anyio.fail_after(TIMEOUT_S):
        async with http_session(hangar.mcp_url) as s:
            names = [p.name for p in (await s.list_prompts()).prompts]
            assert "fixture__greet" in names and "everything__simple-prompt" in names, names
            greet = await s.get_prompt("fixture__greet", {"who": "Py"})
            simple = await s.get_prompt("everything__simple-prompt")
    assert greet.messages[0].content.text == "Hello, Py!"
    assert simple.messages, simple


async def test_unknown_tool_is_an_error(hangar):
    with anyio.fail_after(TIMEOUT_S):
        async with http_session(hangar.mcp_url) as s:
            try:
                r = await s.call_tool("fixture__no_such_tool", {})
            except Exception as e:  # the SDK raises on a JSON-RPC error
                assert "no_such_tool" in str(e) or "Unknown tool" in str(e), e
            else:
                assert r.is_error, r


async def test_modern_revision_without_handshake(hangar):
    """The 2.x SDK's `discover()` speaks the stateless 2026-07-28 revision."""
    with anyio.fail_after(TIMEOUT_S):
        async with http_session(hangar.mcp_url, initialize=False) as s:
            found = await s.discover()
            assert "2026-07-28" in found.supported_versions
            names = tool_names(await s.list_tools())
            r = await s.call_tool("fixture__echo", {"message": "modern"})
    assert "fixture__echo" in names
    assert text(r) == "modern"


async def test_server_endpoint_is_transparent(hangar):
    url = hangar.base_url + "/servers/everything/mcp"
    with anyio.fail_after(TIMEOUT_S):
        async with http_session(url) as s:
            names = tool_names(await s.list_tools())
            r = await s.call_tool("echo", {"message": "direct"})
    assert "echo" in names and "get-sum" in names, names
    assert not any("__" in n for n in names), names
    assert text(r) == "Echo: direct"


async def test_progress_from_server_everything_is_relayed(hangar):
    seen: list[float] = []

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        seen.append(progress)

    with anyio.fail_after(TIMEOUT_S):
        async with http_session(hangar.mcp_url) as s:
            r = await s.call_tool(
                "everything__trigger-long-running-operation",
                {"duration": 0.3, "steps": 3},
                progress_callback=on_progress,
            )
    assert not r.is_error, r
    assert len(seen) == 3 and seen == sorted(seen), seen


async def test_fixture_endpoint_is_transparent(hangar):
    url = hangar.base_url + "/servers/fixture/mcp"
    seen: list[float] = []

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        seen.append(progress)

    with anyio.fail_after(TIMEOUT_S):
        async with http_session(url) as s:
            names = tool_names(await s.list_tools())
            assert "echo" in names and "test_simple_text" in names, names
            assert not any("__" in n for n in names), names
            assert text(await s.call_tool("add", {"a": 40, "b": 2})) == "42"
            r = await s.call_tool("progress", {"steps": 2, "ms": 10}, progress_callback=on_progress)
            assert text(r) == "done 2" and seen == [1, 2], seen
            uris = [str(x.uri) for x in (await s.list_resources()).resources]
            assert "test://static-text" in uris, uris
            prompts = [p.name for p in (await s.list_prompts()).prompts]
            assert "greet" in prompts and "test_simple_prompt" in prompts, prompts


async def test_time_server_endpoint_is_transparent(hangar):
    url = hangar.base_url + "/servers/time/mcp"
    with anyio.fail_after(TIMEOUT_S):
        async with http_session(url) as s:
            names = tool_names(await s.list_tools())
            r = await s.call_tool("convert_time", {"source_timezone": "UTC", "time": "12:00",
                                                   "target_timezone": "Asia/Tokyo"})
    assert set(names) >= {"get_current_time", "convert_time"}, names
    got = as_json(text(r))
    assert got["target"]["datetime"][11:16] == "21:00", got


async def test_unknown_server_endpoint_is_not_found(hangar):
    with anyio.fail_after(TIMEOUT_S):
        with pytest.raises(Exception):
            async with http_session(hangar.base_url + "/servers/no-such-server/mcp") as s:
                await s.list_tools()


async def test_auth_the_sdk_client_with_an_api_key_is_served_and_without_one_refused(hangar_auth):
    from mcp.shared._httpx_utils import create_mcp_http_client
    from mcp.client.session import ClientSession
    from mcp.client.streamable_http import streamable_http_client

    node, key = hangar_auth
    with anyio.fail_after(TIMEOUT_S):
        async with create_mcp_http_client(headers={"X-API-Key": key}) as http:
            async with streamable_http_client(node.mcp_url, http_client=http) as (read, write):
                async with ClientSession(read, write) as s:
                    await s.initialize()
                    names = tool_names(await s.list_tools())
                    assert "fixture__echo" in names, names
                    r = await s.call_tool("fixture__echo", {"message": "with a key"})
                    assert text(r) == "with a key"
    # Without a key the node answers 401: the SDK's initialize fails.
    with anyio.fail_after(TIMEOUT_S):
        with pytest.raises(Exception):
            async with http_session(node.mcp_url):
                pass
