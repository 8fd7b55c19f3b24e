#!/usr/bin/env python3
"""Drives kz's MCP server with the official MCP Python SDK (`mcp`), as an agent would.

Usage: drive.py PLAN.json  — prints one JSON document with what the client saw.

PLAN: {
  "transport": "stdio" | "http",
  "command": [...], "env": {...},          # stdio: the server command line (the SDK spawns it)
  "url": "http://127.0.0.1:PORT/mcp",      # http
  "signing_key": "key.pem", "kid": "k1", "issuer": "https://id.test", "audience": "kz",
  "tokens": {"NAME": {claims...}},         # minted here with PyJWT (ES256); exp added if absent
  "calls": [{"tool": "resolve", "jwt": "NAME" | "raw:<literal>", "args": {...}}]
}
OUTPUT: {"server": {"name", "version"}, "protocol": str,
         "tools": [{"name", "description", "input_schema"}],
         "results": [{"is_error", "text", "structured"}]}
"""
import json
import sys
import time

import anyio
import jwt as pyjwt
from mcp import Client
from mcp.client.stdio import StdioServerParameters


def mint(plan):
    key = open(plan["signing_key"]).read()
    now = int(time.time())
    tokens = {}
    for name, claims in plan.get("tokens", {}).items():
        body = {"iss": plan["issuer"], "aud": plan["audience"], "iat": now, "exp": now + 300}
        body.update(claims)
        tokens[name] = pyjwt.encode(body, key, algorithm="ES256", headers={"kid": plan["kid"]})
    return tokens


async def run(plan):
    tokens = mint(plan)
    if plan["transport"] == "stdio":
        server = StdioServerParameters(
            command=plan["command"][0], args=plan["command"][1:], env=plan.get("env") or {}
        )
    else:
        server = plan["url"]
    out = {"results": []}
    async with Client(server) as client:
        info = client.server_info
        out["server"] = {"name": info.name if info else None, "version": info.version if info else None}
        out["protocol"] = client.protocol_version
        listed = await client.list_tools()
        out["tools"] = [
            {"name": t.name, "description": t.description, "input_schema": t.input_schema}
            for t in listed.tools
        ]
        for call in plan.get("calls", []):
            args = dict(call.get("args", {}))
            ref = call.get("jwt")
            if ref is not None:
                args["jwt"] = ref[4:] if ref.startswith("raw:") else tokens[ref]
            result = await client.call_tool(call["tool"], args)
            text = "".join(getattr(c, "text", "") for c in result.content)
            out["results"].append(
                {"is_error": result.is_error, "text": text, "structured": result.structured_content}
            )
    return out


def main():
    plan = json.load(open(sys.argv[1]))
    out = anyio.run(run, plan)
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main()
