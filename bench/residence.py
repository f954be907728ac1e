#!/usr/bin/env python3
"""How long a UDP proxy itself holds each query and its answer, read from a packet
capture on the loopback device.

The latency probe run with `unique` (lb/examples/latency.rs) asks for a name of its own
per query, `q<n>.wild.example.test. TXT`, so each of a query's four packets can be found
in the capture: client → proxy (query in), proxy → backend (query out), backend → proxy
(answer in), proxy → client (answer out). On loopback a packet is captured when it is
sent, so

    residence = (query out - query in) + (answer out - answer in)

is the time the proxy held the query and the answer: waiting to be woken and
scheduled, and its own work. The backend's time, and the client's, are not in it. A
latency percentile "added over BIND" is the difference of two distributions, each
with BIND's own stalls of several milliseconds in its tail; this is measured per
query.

A query the proxy took in and never sent on, or whose answer it took in and never
sent back, counts as slower than any (a percentile that lands on one is null), as in
the latency probe: a proxy that drops while it stalls must not look faster than one
that answers late. A query the backend never answered is left out: that is not the
proxy's time.

usage: residence.py PCAP PROXY_PORT BACKEND_PORT...
Prints one JSON line: queries seen, complete (all four packets), lost in the proxy,
lost behind it, percentiles of the residence and of its two halves in microseconds.
"""

import json
import struct
import sys

# Link-layer header lengths of the capture types tcpdump writes for `-i lo` / `-i any`.
LINK_HEADER = {1: 14, 113: 16, 276: 20}


def packets(path):
    """(timestamp in ns, link type, bytes) of each packet of a pcap file."""
    with open(path, "rb") as f:
        head = f.read(24)
        if len(head) < 24:
            return
        magic = head[:4]
        endian, scale = {b"\xd4\xc3\xb2\xa1": ("<", 1000), b"\xa1\xb2\xc3\xd4": (">", 1000),
                         b"\x4d\x3c\xb2\xa1": ("<", 1), b"\xa1\xb2\x3c\x4d": (">", 1)}[magic]
        link = struct.unpack(endian + "I", head[20:24])[0]
        while True:
            h = f.read(16)
            if len(h) < 16:
                return
            sec, frac, caplen, _ = struct.unpack(endian + "IIII", h)
            yield sec * 1_000_000_000 + frac * scale, link, f.read(caplen)


def qname(dns):
    """The raw first question name, or None if the message has none or is cut."""
    if len(dns) < 12 or struct.unpack("!H", dns[4:6])[0] == 0:
        return None
    i = 12
    while i < len(dns):
        n = dns[i]
        if n == 0:
            return dns[12:i]
        if n & 0xC0:
            return None
        i += 1 + n
    return None


def udp(link, frame):
    """(source port, destination port, payload) of an IPv4 UDP packet, else None."""
    off = LINK_HEADER.get(link)
    if off is None or len(frame) < off + 28:
        return None
    ip = frame[off:]
    if ip[0] >> 4 != 4 or ip[9] != 17:
        return None
    ihl = (ip[0] & 0x0F) * 4
    sport, dport = struct.unpack("!HH", ip[ihl:ihl + 4])
    return sport, dport, ip[ihl + 8:]


LOST = float("inf")


def percentile(sorted_values, p):
    if not sorted_values:
        return None
    rank = round(p / 100 * (len(sorted_values) - 1))
    v = sorted_values[rank]
    return None if v == LOST else round(v / 1000, 1)


def residence(path, proxy, backends):
    # Per probe name: [query in, query out, answer in, answer out], the first of each.
    seen = {}
    for ts, link, frame in packets(path):
        u = udp(link, frame)
        if not u:
            continue
        sport, dport, dns = u
        name = qname(dns)
        if name is None or name[1:2] != b"q":  # not a probe's name (a health check)
            continue
        qr = len(dns) > 2 and dns[2] & 0x80
        if dport == proxy and not qr:
            hop = 0
        elif dport in backends and not qr:
            hop = 1
        elif sport in backends and qr:
            hop = 2
        elif sport == proxy and qr:
            hop = 3
        else:
            continue
        t = seen.setdefault(name, [None] * 4)
        if t[hop] is None:
            t[hop] = ts
    total, query_side, answer_side = [], [], []
    complete = lost_in_proxy = lost_behind = 0
    for qi, qo, ai, ao in seen.values():
        if qi is None:
            continue  # the capture started late
        if qo is None and ao is not None:
            complete += 1  # answered by the proxy itself (a SERVFAIL): all of it inside
            query_side.append(ao - qi)
            total.append(ao - qi)
        elif qo is None:
            lost_in_proxy += 1
            total.append(LOST)
            query_side.append(LOST)
        elif ai is None:
            lost_behind += 1
        elif ao is None:
            lost_in_proxy += 1
            total.append(LOST)
            query_side.append(qo - qi)
            answer_side.append(LOST)
        else:
            complete += 1
            query_side.append(qo - qi)
            answer_side.append(ao - ai)
            total.append(qo - qi + ao - ai)
    for xs in (total, query_side, answer_side):
        xs.sort()
    out = {"queries": len(seen), "complete": complete, "lost_in_proxy": lost_in_proxy,
           "lost_behind": lost_behind}
    for key, xs in [("", total), ("query_", query_side), ("answer_", answer_side)]:
        for p, label in [(50, "p50"), (90, "p90"), (99, "p99"), (99.9, "p999"), (100, "max")]:
            out[f"{key}{label}_us"] = percentile(xs, p)
    return out


def main():
    if len(sys.argv) < 4:
        print(__doc__, file=sys.stderr)
        sys.exit(2)
    print(json.dumps(residence(sys.argv[1], int(sys.argv[2]), {int(p) for p in sys.argv[3:]})))


if __name__ == "__main__":
    main()
