#!/usr/bin/env python3
"""Waits until a dnslb load balancer is healthy; run on the host by the dnslb role.

Healthy means, at the same moment:
  1. the admin API answers GET /healthz with 200 (an active backend is up), or with 503
     while the load balancer has no backends at all (GET /v1/status: "backends": 0), the
     valid state of a fresh load balancer before `deployer bootstrap`; a 503 with
     backends configured (none of them up) is not healthy;
  2. every DNS listen address answers a query for the health name and type over UDP
     (RD=0): with NOERROR when a backend is up, with any well-formed answer (SERVFAIL is
     expected) when there are no backends.
Checks repeat every second until they pass (exit 0, one summary line) or --timeout
seconds have passed (exit 1, with the last reason). Python 3 standard library only.
"""
import argparse
import json
import os
import random
import socket
import struct
import sys
import time
import urllib.error
import urllib.request

QTYPES = {"A": 1, "NS": 2, "SOA": 6, "MX": 15, "TXT": 16, "AAAA": 28}
RCODES = {0: "NOERROR", 1: "FORMERR", 2: "SERVFAIL", 3: "NXDOMAIN", 4: "NOTIMP", 5: "REFUSED"}


def host_port(addr):
    """("IP", port) from "IP:port" or "[IPv6]:port"."""
    host, _, port = addr.rpartition(":")
    return host.strip("[]"), int(port)


def admin_base(listen):
    host, port = host_port(listen)
    # A wildcard admin address is reached on loopback.
    host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
    return "http://%s:%d" % ("[%s]" % host if ":" in host else host, port)


def http_get(url, token=None):
    """(status, parsed JSON or None); status None when nothing answered."""
    req = urllib.request.Request(url)
    if token:
        req.add_header("Authorization", "Bearer " + token)
    try:
        with urllib.request.urlopen(req, timeout=2) as r:
            return r.status, json.loads(r.read() or b"null")
    except urllib.error.HTTPError as e:
        try:
            return e.code, json.loads(e.read() or b"null")
        except ValueError:
            return e.code, None
    except (OSError, ValueError) as e:
        return None, str(e)


def dns_query(addr, name, qtype):
    """The RCODE name of the answer to (name, qtype) from addr, or raises OSError."""
    host, port = host_port(addr)
    qid = random.randrange(65536)
    qname = b"".join(
        bytes([len(label)]) + label.encode("ascii") for label in name.rstrip(".").split(".") if label
    ) + b"\0"
    packet = struct.pack(">HHHHHH", qid, 0, 1, 0, 0, 0) + qname + struct.pack(">HH", QTYPES[qtype], 1)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        s.settimeout(1.0)
        s.sendto(packet, (host, port))
        deadline = time.monotonic() + 1.0
        while True:
            s.settimeout(max(0.01, deadline - time.monotonic()))
            data, _ = s.recvfrom(4096)
            if len(data) >= 12:
                rid, flags = struct.unpack(">HH", data[:4])
                if rid == qid and flags & 0x8000:
                    return RCODES.get(flags & 0xF, "RCODE%d" % (flags & 0xF))


def check(args, token):
    """None when healthy, else the reason it is not."""
    base = admin_base(args.admin)
    code, body = http_get(base + "/healthz")
    if code is None:
        return "admin API %s does not answer: %s" % (base, body)
    if code == 200:
        want_noerror = True
    elif code == 503:
        st, status = http_get(base + "/v1/status", token)
        if st != 200 or not isinstance(status, dict):
            return "/healthz is 503 and GET /v1/status answered %s" % st
        if status.get("backends", 0) != 0:
            return "/healthz is 503: none of its %s backend(s) is up" % status.get("backends")
        want_noerror = False
    else:
        return "/healthz answered %s" % code
    for addr in args.dns:
        try:
            rcode = dns_query(addr, args.name, args.type)
        except OSError as e:
            return "no DNS answer from %s: %s" % (addr, e)
        if want_noerror and rcode != "NOERROR":
            return "%s answered %s %s with %s" % (addr, args.name, args.type, rcode)
    return None


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--admin", required=True, help="admin listen address IP:port")
    p.add_argument("--token-file", help="admin API bearer token file")
    p.add_argument("--dns", action="append", required=True, help="DNS listen address IP:port")
    p.add_argument("--name", default="example.test.")
    p.add_argument("--type", default="SOA", choices=sorted(QTYPES))
    p.add_argument("--timeout", type=float, default=60)
    args = p.parse_args()
    token = None
    if args.token_file and os.path.exists(args.token_file):
        with open(args.token_file) as f:
            token = f.read().strip()
    deadline = time.monotonic() + args.timeout
    while True:
        reason = check(args, token)
        if reason is None:
            print("dnslb healthy: admin %s, DNS %s" % (args.admin, ", ".join(args.dns)))
            return 0
        if time.monotonic() >= deadline:
            print("dnslb not healthy after %gs: %s" % (args.timeout, reason), file=sys.stderr)
            return 1
        time.sleep(1)


if __name__ == "__main__":
    sys.exit(main())
