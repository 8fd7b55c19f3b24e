"""The demo's "remote API": HTTPS, accepts only the real key, and (carelessly) echoes it back.

Usage: api_server.py ADDR PORT CERT KEY EXPECTED_KEY_ENV
"""

import http.server
import json
import os
import ssl
import sys

addr, port, cert, key, expected_env = sys.argv[1:6]
expected = os.environ[expected_env]


class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        auth = self.headers.get("Authorization", "")
        ok = auth == f"Bearer {expected}"
        body = json.dumps(
            {
                "authorized": ok,
                "host": self.headers.get("Host"),
                # A careless API that echoes credentials: kz scrubs them on the way back.
                "you_sent": auth,
            }
        ).encode()
        self.send_response(200 if ok else 401)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
        print(f"api: {self.command} {self.path} authorized={ok}", flush=True)

    def log_message(self, *args):
        pass


ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain(cert, key)
server = http.server.ThreadingHTTPServer((addr, int(port)), Handler)
server.socket = ctx.wrap_socket(server.socket, server_side=True)
print(f"api: listening on {addr}:{port}", flush=True)
server.serve_forever()
