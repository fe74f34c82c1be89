"""Small helpers shared by the SDK tests."""

from __future__ import annotations

import json
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator

import mcp.types as types
from mcp import ClientSession
from mcp.client.streamable_http import streamable_http_client

HANDSHAKE_REVISIONS = {"2024-11-05", "2025-03-26", "2025-06-18", "2025-11-25"}


@asynccontextmanager
async def http_session(url: str, *, initialize: bool = True, **callbacks: Any) -> AsyncIterator[ClientSession]:
    """A `ClientSession` over Streamable HTTP to `url`, initialized unless told otherwise."""
    async with streamable_http_client(url) as (read, write):
        async with ClientSession(read, write, **callbacks) as session:
            if initialize:
                await session.initialize()
            yield session


def text(result: types.CallToolResult) -> str:
    """The text of the first content block of a successful tool result."""
    assert not result.is_error, f"tool failed: {result}"
    block = result.content[0]
    assert isinstance(block, types.TextContent), f"not text: {block}"
    return block.text


def tool_names(listing: types.ListToolsResult) -> list[str]:
    return [t.name for t in listing.tools]


def as_json(s: str) -> Any:
    return json.loads(s)
