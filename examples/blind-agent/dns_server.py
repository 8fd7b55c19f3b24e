"""The demo network's DNS server: answers A queries for a fixed zone, NXDOMAIN otherwise.

Usage: dns_server.py ADDR NAME=IP [NAME=IP ...]
"""

import socket
import struct
import sys

addr = sys.argv[1]
zone = dict(arg.split("=", 1) for arg in sys.argv[2:])


def parse_name(data, off):
    labels = []
    while data[off]:
        n = data[off]
        labels.append(data[off + 1 : off + 1 + n].decode("ascii", "replace"))
        off += n + 1
    return ".".join(labels).lower(), off + 1


sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sock.bind((addr, 53))
print(f"dns: serving {zone} on {addr}:53", flush=True)
while True:
    data, peer = sock.recvfrom(4096)
    try:
        qid, flags, qd = struct.unpack(">HHH", data[:6])
        name, end = parse_name(data, 12)
        qtype, _ = struct.unpack(">HH", data[end : end + 4])
        question = data[12 : end + 4]
    except (struct.error, IndexError):
        continue
    ip = zone.get(name)
    answers = b""
    rcode = 0
    if ip is None:
        rcode = 3  # NXDOMAIN
    elif qtype == 1:
        answers = b"\xc0\x0c" + struct.pack(">HHIH", 1, 1, 30, 4) + socket.inet_aton(ip)
    header = struct.pack(
        ">HHHHHH", qid, 0x8400 | (flags & 0x0100) | rcode, 1, 1 if answers else 0, 0, 0
    )
    sock.sendto(header + question + answers, peer)
    print(f"dns: {name} type {qtype} -> {ip if answers else 'no answer'}", flush=True)
