#!/usr/bin/env python3
"""What response rate limiting costs: CPU per query of dnslb with `[rate_limit]` off
and on, in the same run, in front of the same two real BIND backends, on loopback.

Two dnslb processes run side by side (one without `[rate_limit]`, one with a limit
far above the load, so that every query goes through the limiter's bookkeeping and
none is limited; no source is exempt, since an exempt source skips the limiter).
dnsperf sends a fixed rate to each in interleaved rounds; the CPU time of each dnslb
process over its rounds, divided by the queries it answered, is compared (median of
the rounds). Prints a markdown summary. Run through `bench/run --rrl`, with nothing
else busy.
"""

import argparse
import os
import statistics
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(__file__))
import harness as h  # noqa: E402

PORTS = {"off": 15358, "on": 15359}
ADMIN = {"off": 15382, "on": 15383}
RRL = """[rate_limit]
responses_per_second = 10000000
burst = 10000000
ipv4_prefix = 24
ipv6_prefix = 56
slip = 2
exempt = []
max_clients = 100000
"""


def start(procs, work, mode):
    cfg = os.path.join(work, f"dnslb-{mode}.toml")
    with open(cfg, "w") as f:
        f.write(f"""[listen]
dns = ["127.0.0.1:{PORTS[mode]}"]
admin = "127.0.0.1:{ADMIN[mode]}"
[state]
path = "{work}/state-{mode}.json"
[health]
query_name = "example.test."
[[backend]]
name = "a1"
address = "127.0.0.1:{h.B1}"
[[backend]]
name = "a2"
address = "127.0.0.1:{h.B2}"
{RRL if mode == "on" else ""}""")
    p = procs.start(f"dnslb-{mode}", [h.DNSLB, "--config", cfg], stdout=subprocess.DEVNULL,
                    stderr=open(os.path.join(work, f"dnslb-{mode}.log"), "w"))
    h.wait_dns(PORTS[mode])
    return p.pid


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rate", type=int, default=20000)
    ap.add_argument("--seconds", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=5)
    a = ap.parse_args()
    work = tempfile.mkdtemp(prefix="dnslb-rrl-")
    qfile = os.path.join(work, "queries.txt")
    with open(qfile, "w") as f:
        f.write("\n".join(h.QUERIES) + "\n")
    procs = h.Procs()
    samples = {"off": [], "on": []}
    lost = {"off": 0, "on": 0}
    try:
        h.start_named(procs, work, h.B1)
        h.start_named(procs, work, h.B2)
        pids = {m: start(procs, work, m) for m in ("off", "on")}
        tck = os.sysconf("SC_CLK_TCK")
        for k in range(a.rounds):
            for mode in (("off", "on") if k % 2 == 0 else ("on", "off")):
                before = h.cpu_ticks([pids[mode]])
                r = h.dnsperf(PORTS[mode], qfile, a.seconds, qps=a.rate)
                spent = h.cpu_ticks([pids[mode]]) - before
                us = spent * 1e6 / tck / max(r["completed"], 1)
                samples[mode].append(us)
                lost[mode] += r["lost"]
                h.log(f"  round {k + 1} rrl {mode}: {us:.2f} us/query "
                      f"({r['completed']:.0f} answered, lost {r['lost']:.0f})")
        cmd = r["cmd"].replace(work + "/", "")
    finally:
        procs.stop_all()
    off, on = statistics.median(samples["off"]), statistics.median(samples["on"])
    cpu, cores = h.machine()
    print(f"\nMachine: {cpu}, {cores} CPUs. {a.rounds} interleaved rounds of {a.seconds} s at "
          f"{a.rate} qps each; dnsperf: `{cmd}` (port per process).\n")
    print("| dnslb | CPU µs/query (median) | rounds | lost |")
    print("|---|---|---|---|")
    for mode, med in (("RRL off", off), ("RRL on", on)):
        m = mode.split()[1]
        print(f"| {mode} | {med:.2f} | {', '.join(f'{x:.2f}' for x in samples[m])} | {lost[m]:.0f} |")
    print(f"\nRRL on / off: **{on / off:.3f}×** (target ≤ 1.05×)")


if __name__ == "__main__":
    main()
