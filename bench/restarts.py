#!/usr/bin/env python3
"""Queries lost across restarts and upgrades, under a steady dnsperf load, on loopback:

- dnslb: N hitless binary upgrades (SIGUSR2 to the running process, each waiting until
  the old process is gone), and N socket-activated restarts (tests/sd_holder.py holds
  the sockets as systemd's dnslb.socket would, and restarts dnslb as `systemctl
  restart` does: SIGTERM, wait, start);
- dnslb without socket activation: N plain restarts (SIGTERM, start again), the case
  the two above exist for;
- nginx stream: N `nginx -s reload` (its way to change configuration or workers
  without a restart);
- dnsdist: no upgrade in place, so not measured.

Prints a markdown table. Run through `bench/run --restarts`, with nothing else busy.
"""

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

sys.path.insert(0, os.path.dirname(__file__))
import harness as h  # noqa: E402

HOLDER = os.path.join(h.ROOT, "lb/tests/sd_holder.py")


def under_load(port, qfile, qps, seconds, action):
    """Runs `action()` while dnsperf sends `qps` for `seconds`; dnsperf's result."""
    box = {}

    def load():
        box["r"] = h.dnsperf(port, qfile, seconds, qps=qps, clients=4)

    t = threading.Thread(target=load)
    t.start()
    time.sleep(1.0)
    action()
    t.join()
    return box["r"]


def pid_alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(") ", 1)[1][0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


def wait_gone(pid, limit=20.0):
    deadline = time.time() + limit
    while pid_alive(pid):
        if time.time() > deadline:
            raise RuntimeError(f"pid {pid} did not exit")
        time.sleep(0.01)


def status_pid():
    with urllib.request.urlopen(f"http://127.0.0.1:{h.ADMIN["dnslb"]}/v1/status", timeout=5) as r:
        return json.load(r)["pid"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--count", type=int, default=40)
    ap.add_argument("--qps", type=int, default=10000)
    a = ap.parse_args()
    seconds = max(10, int(a.count * 0.5) + 6)
    work = tempfile.mkdtemp(prefix="dnslb-restarts-")
    qfile = os.path.join(work, "queries.txt")
    with open(qfile, "w") as f:
        f.write("\n".join(h.QUERIES) + "\n")
    procs = h.Procs()
    rows = []
    try:
        h.start_named(procs, work, h.B1)
        h.start_named(procs, work, h.B2)
        port = h.PORTS["dnslb"]

        # dnslb, SIGUSR2 upgrades.
        h.start_dnslb(procs, work)
        cfg = os.path.join(work, "dnslb.toml")

        def upgrades():
            for _ in range(a.count):
                pid = status_pid()
                os.kill(pid, signal.SIGUSR2)
                deadline = time.time() + 20
                while True:
                    try:
                        if status_pid() != pid:
                            break
                    except OSError:
                        pass
                    if time.time() > deadline:
                        raise RuntimeError("upgrade did not happen")
                    time.sleep(0.02)
                wait_gone(pid)
                time.sleep(0.3)

        r = under_load(port, qfile, a.qps, seconds, upgrades)
        rows.append(("dnslb", f"{a.count} SIGUSR2 upgrades", r))
        os.kill(status_pid(), signal.SIGTERM)
        time.sleep(1.0)

        # dnslb, plain restarts: nothing holds the sockets between two processes.
        def plain():
            for _ in range(a.count):
                pid = status_pid()
                os.kill(pid, signal.SIGTERM)
                wait_gone(pid)
                procs.start("dnslb", [h.DNSLB, "--config", cfg], stdout=subprocess.DEVNULL,
                            stderr=open(os.path.join(work, "dnslb-plain.log"), "a"))
                h.wait_dns(port)
                time.sleep(0.3)

        procs.start("dnslb", [h.DNSLB, "--config", cfg], stdout=subprocess.DEVNULL,
                    stderr=open(os.path.join(work, "dnslb-plain.log"), "a"))
        h.wait_dns(port)
        r = under_load(port, qfile, a.qps, seconds, plain)
        rows.append(("dnslb", f"{a.count} restarts, no socket activation", r))
        os.kill(status_pid(), signal.SIGTERM)
        time.sleep(1.0)

        # dnslb, socket-activated restarts.
        holder = subprocess.Popen(
            ["python3", HOLDER, "--udp", f"127.0.0.1:{port}", "--tcp", f"127.0.0.1:{port}", "--",
             h.DNSLB, "--config", cfg],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
            stderr=open(os.path.join(work, "dnslb-holder.log"), "w"))

        def holder_cmd(cmd):
            holder.stdin.write(cmd + "\n")
            holder.stdin.flush()
            out = holder.stdout.readline().strip()
            if not out.startswith("ready"):
                raise RuntimeError(f"holder {cmd}: {out}")

        holder_cmd("start")

        def restarts():
            for _ in range(a.count):
                holder_cmd("restart")
                time.sleep(0.3)

        r = under_load(port, qfile, a.qps, seconds, restarts)
        rows.append(("dnslb", f"{a.count} socket-activated restarts", r))
        holder.stdin.write("stop\n")
        holder.stdin.flush()
        holder.wait(timeout=30)

        # nginx, reloads.
        h.start_nginx(procs, work)
        nport = h.PORTS["nginx"]

        def reloads():
            for i in range(a.count):
                h.write_nginx_conf(work, [h.B1, h.B2] if i % 2 else [h.B2, h.B1])
                subprocess.run(["nginx", "-p", work, "-c", os.path.join(work, "nginx.conf"), "-s", "reload"],
                               check=True, capture_output=True)
                time.sleep(0.3)

        r = under_load(nport, qfile, a.qps, seconds, reloads)
        rows.append(("nginx stream", f"{a.count} reloads (`nginx -s reload`)", r))
    finally:
        procs.stop_all()
    print("\n| target | what | queries sent | lost | SERVFAIL |")
    print("|---|---|---|---|---|")
    for target, what, r in rows:
        print(f"| {target} | {what} | {r['sent']:.0f} | {r['lost']:.0f} | {r['servfail']} |")
    print(f"\ndnsperf: {rows[0][2]['cmd'].replace(work + '/', '')}")


if __name__ == "__main__":
    main()
