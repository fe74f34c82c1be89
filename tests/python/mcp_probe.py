"""Drive the official MCP Python SDK client for the Rust end-to-end tests.

Usage: python mcp_probe.py SPEC.json

SPEC: {"ca": "<CA PEM file or null>", "timeout_s": 30,
       "probes": [{"name": "...", "url": "https://.../mcp", "headers": {"X-API-Key": "..."},
                   "call": {"name": "<tool>", "arguments": {...}} or null}]}

For each probe, in order, one line of JSON on stdout:
  {"name", "http_status": <status of a refused connection or null>, "tools": [names] or null,
   "call": {"is_error": bool, "text": "..."} or null, "rpc_error": {"code", "message"} or null,
   "error": "<anything else that went wrong>" or null}

The secrets in the headers are never printed. Exit status 0 once every probe has a line.
"""

from __future__ import annotations

import json
import ssl
import sys

import anyio
import httpx2
from mcp import ClientSession
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError


def _leaves(exc: BaseException, depth: int = 0):
    """The exception, the members of exception groups and the causes, depth-first (bounded)."""
    if depth > 20:
        return
    yield exc
    for inner in getattr(exc, "exceptions", ()) or ():
        yield from _leaves(inner, depth + 1)
    cause = exc.__cause__ or exc.__context__
    if cause is not None:
        yield from _leaves(cause, depth + 1)


def _http_status(exc: BaseException) -> int | None:
    """The HTTP status behind a (possibly grouped) failure of the SDK's transport."""
    for e in _leaves(exc):
        response = getattr(e, "response", None)
        code = getattr(response, "status_code", None)
        if isinstance(code, int):
            return code
    return None


def _describe(exc: BaseException) -> str:
    return "; ".join(f"{type(e).__name__}: {e}" for e in _leaves(exc))[:800]


async def _probe(p: dict, verify, timeout_s: float) -> dict:
    out = {"name": p["name"], "http_status": None, "tools": None, "call": None, "rpc_error": None, "error": None}
    # The SDK turns a refused request into a generic error; the status is read off the wire.
    refused: list[int] = []

    async def on_response(response: httpx2.Response) -> None:
        if response.status_code >= 400:
            refused.append(response.status_code)

    try:
        with anyio.fail_after(timeout_s):
            async with httpx2.AsyncClient(
                verify=verify, headers=p.get("headers") or {}, timeout=timeout_s,
                event_hooks={"response": [on_response]},
            ) as http:
                async with streamable_http_client(p["url"], http_client=http) as (read, write):
                    async with ClientSession(read, write) as s:
                        await s.initialize()
                        listed = await s.list_tools()
                        out["tools"] = sorted(t.name for t in listed.tools)
                        call = p.get("call")
                        if call:
                            try:
                                r = await s.call_tool(call["name"], call.get("arguments") or {})
                                text = "".join(getattr(c, "text", "") for c in r.content)
                                out["call"] = {"is_error": bool(r.is_error), "text": text}
                            except MCPError as e:
                                out["rpc_error"] = {"code": e.code, "message": e.error.message}
    except BaseException as e:  # noqa: BLE001 - report every failure as data
        if isinstance(e, (KeyboardInterrupt, SystemExit)):
            raise
        out["http_status"] = _http_status(e) or (refused[0] if refused else None)
        if out["http_status"] is None:
            out["error"] = _describe(e)
    return out


async def main(spec_path: str) -> None:
    with open(spec_path) as f:
        spec = json.load(f)
    verify = ssl.create_default_context(cafile=spec["ca"]) if spec.get("ca") else True
    timeout_s = float(spec.get("timeout_s", 30))
    for p in spec["probes"]:
        print(json.dumps(await _probe(p, verify, timeout_s)), flush=True)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: mcp_probe.py SPEC.json")
    anyio.run(main, sys.argv[1])
