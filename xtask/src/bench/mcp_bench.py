"""`cargo xtask bench mcp`: one client, the same HTTPS upstream, four paths.

direct-keepalive   httpx to the upstream, one kept-alive connection (the floor)
direct-newconn     httpx to the upstream, a new TLS connection per request (what kz does)
kz-mcp-stdio       the MCP `fetch` tool over stdio (official MCP SDK client)
kz-mcp-http        the MCP `fetch` tool over streamable HTTP

Prints per-path latency (mean/p50/p99) and requests/s, and ratios against both direct paths.
Argument: a JSON config file written by xtask.
"""
import json
import statistics
import sys
import time

import anyio
import httpx2 as httpx
import jwt as pyjwt
from mcp import Client
from mcp.client.stdio import StdioServerParameters


def stats(samples):
    s = sorted(samples)
    return {
        "mean": statistics.fmean(s) * 1000,
        "p50": s[len(s) // 2] * 1000,
        "p99": s[min(len(s) - 1, int(len(s) * 0.99))] * 1000,
        "rps": len(s) / sum(s),
    }


def direct(cfg, keepalive):
    out = []
    headers = {"Authorization": f"Bearer {cfg['secret']}"}
    client = httpx.Client(verify=cfg["ca"]) if keepalive else None
    for _ in range(cfg["warmup"] + cfg["n"]):
        t = time.perf_counter()
        if keepalive:
            r = client.get(cfg["url"], headers=headers)
        else:
            with httpx.Client(verify=cfg["ca"]) as c:
                r = c.get(cfg["url"], headers=headers)
        out.append(time.perf_counter() - t)
        assert r.status_code == 200, r.status_code
    if client:
        client.close()
    return out[cfg["warmup"]:]


async def via_mcp(cfg, server):
    now = int(time.time())
    token = pyjwt.encode(
        {"iss": "https://id.bench", "aud": "kz-bench", "iat": now, "exp": now + 3600, "agent": "bench"},
        open(cfg["key"]).read(),
        algorithm="ES256",
        headers={"kid": "b1"},
    )
    out = []
    async with Client(server) as client:
        for _ in range(cfg["warmup"] + cfg["n"]):
            t = time.perf_counter()
            r = await client.call_tool("fetch", {"jwt": token, "resource": "bench/api", "url": cfg["url"]})
            out.append(time.perf_counter() - t)
            assert not r.is_error, r.content
            assert r.structured_content["status"] == 200, r.structured_content
    return out[cfg["warmup"]:]


def main():
    cfg = json.load(open(sys.argv[1]))
    results = {
        "direct-keepalive": stats(direct(cfg, True)),
        "direct-newconn": stats(direct(cfg, False)),
        "kz-mcp-stdio": stats(
            anyio.run(via_mcp, cfg, StdioServerParameters(command=cfg["kz"][0], args=cfg["kz"][1:], env=cfg["env"]))
        ),
        "kz-mcp-http": stats(anyio.run(via_mcp, cfg, cfg["mcp_url"])),
    }
    base_k = results["direct-keepalive"]["mean"]
    base_n = results["direct-newconn"]["mean"]
    print(f"{cfg['n']} sequential GETs per path (after {cfg['warmup']} warm-up), one Python client")
    print(f"{'path':<18} {'mean ms':>8} {'p50 ms':>8} {'p99 ms':>8} {'req/s':>8} {'x keepalive':>12} {'x newconn':>10}")
    for name, r in results.items():
        print(
            f"{name:<18} {r['mean']:8.2f} {r['p50']:8.2f} {r['p99']:8.2f} {r['rps']:8.1f}"
            f" {r['mean'] / base_k:12.2f} {r['mean'] / base_n:10.2f}"
        )
    print("peers: KeyZero's MCP server is not run (building kz-server 0.3 pulls the AWS SDK with aws-lc, which needs cmake/clang here; its fetch also refuses every private upstream address).")


if __name__ == "__main__":
    main()
