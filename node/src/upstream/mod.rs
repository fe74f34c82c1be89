//! Upstream MCP client transports (being written).
