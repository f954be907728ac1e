#!/usr/bin/env python3
"""Side-by-side benchmark of dnslb, dnsdist and nginx stream in front of the same two
real BIND backends, plus BIND queried directly, all on loopback, measured with dnsperf.

Measures, per target: UDP and TCP maximum throughput (median of rounds), CPU
microseconds per answered query at a fixed rate (process CPU time / queries), p50/p99
latency at a fixed rate and the latency added over direct BIND, peak RSS after a
50k qps run, and queries lost across 40 cut-overs under load (dnslb swaps via its admin
API, nginx reloads, dnsdist removing and adding servers through its console).

Prints one table and writes docs/benchmarks.md (unless --no-write). Run it through
bench/run, which installs what is missing and builds dnslb in release mode.
"""

import argparse
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
ZONE = os.path.join(ROOT, "ansible/zones/example.test.zone")
DNSLB = os.path.join(ROOT, "target/release/dnslb")
PROBE = os.path.join(ROOT, "target/release/examples/latency")
B1, B2 = 15301, 15302
PORTS = {"bind": B1, "dnslb": 15353, "dnsdist": 15354, "nginx": 15355, "floor": 15356}
DNSLB_ADMIN = 15380
DNSDIST_CONSOLE = 15399
QUERIES = [
    "www.example.test A", "www.example.test AAAA", "example.test MX", "example.test SOA",
    "ftp.example.test CNAME", "_sip._udp.example.test SRV", "x.wild.example.test TXT",
    "example.test NS", "missing.example.test A", "example.test CAA",
]


def log(*a):
    print(*a, file=sys.stderr, flush=True)


class Procs:
    """Every process we start, stopped at exit."""

    def __init__(self):
        self.procs = []

    def start(self, name, argv, **kw):
        log(f"  starting {name}: {' '.join(argv)}")
        p = subprocess.Popen(argv, **kw)
        self.procs.append((name, p))
        return p

    def stop_all(self):
        for _, p in reversed(self.procs):
            if p.poll() is None:
                p.terminate()
        for _, p in reversed(self.procs):
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()


# --backend echo: bench/echo-backend.c instead of named (UDP only, no records).
ECHO = False


def wait_dns(port, tcp=False, limit=20.0):
    deadline = time.time() + limit
    while time.time() < deadline:
        args = ["dig", "@127.0.0.1", "-p", str(port), "+time=1", "+tries=1", "example.test", "SOA"]
        if tcp:
            args.insert(1, "+tcp")
        out = subprocess.run(args, capture_output=True, text=True).stdout
        # The zone's SOA serial from named; from the echo backend, an empty NOERROR
        # answer with AA set.
        if ("flags: qr aa" in out and "status: NOERROR" in out) if ECHO else "2026112901" in out:
            return
        time.sleep(0.2)
    raise RuntimeError(f"nothing answers on port {port}")


def start_named(procs, work, port):
    d = os.path.join(work, f"named-{port}")
    os.makedirs(d, exist_ok=True)
    shutil.copy(ZONE, os.path.join(d, "example.test.zone"))
    with open(os.path.join(d, "named.conf"), "w") as f:
        f.write(f"""options {{
    directory "{d}";
    pid-file none;
    listen-on port {port} {{ 127.0.0.1; }};
    listen-on-v6 {{ none; }};
    recursion no;
    dnssec-validation no;
    notify no;
    minimal-responses yes;
    tcp-clients 10000;
}};
controls {{ }};
logging {{ category default {{ null; }}; }};
zone "example.test" {{ type primary; file "example.test.zone"; }};
""")
    named = shutil.which("named") or "/usr/sbin/named"
    # One worker thread each: two backends, two cores.
    p = procs.start(f"named:{port}", [named, "-g", "-n", "1", "-c", os.path.join(d, "named.conf")],
                    stdout=subprocess.DEVNULL, stderr=open(os.path.join(d, "named.log"), "w"))
    wait_dns(port)
    return p


def start_dnslb(procs, work):
    cfg = os.path.join(work, "dnslb.toml")
    with open(cfg, "w") as f:
        f.write(f"""[listen]
dns = ["127.0.0.1:{PORTS['dnslb']}"]
admin = "127.0.0.1:{DNSLB_ADMIN}"
[state]
path = "{work}/dnslb-state.json"
[balance]
policy = "least-outstanding"
[health]
query_name = "example.test."
[tcp]
max_connections = 10000
[[backend]]
name = "a1"
address = "127.0.0.1:{B1}"
[[backend]]
name = "a2"
address = "127.0.0.1:{B2}"
""")
    p = procs.start("dnslb", [DNSLB, "--config", cfg], stdout=subprocess.DEVNULL,
                    stderr=open(os.path.join(work, "dnslb.log"), "w"))
    wait_dns(PORTS["dnslb"])
    return [p.pid]


DNSDIST_KEY = "bXlzZWNyZXRrZXlmb3J0aGViZW5jaG1hcmsxMjM0NTY="


def dnsdist_server(port, name):
    # The echo backend answers the check with no records, which mustResolve fails.
    must = "" if ECHO else ", mustResolve=true"
    return (f'newServer({{address="127.0.0.1:{port}", name="{name}", checkName="example.test.", '
            f'checkType="SOA"{must}}})')


def start_dnsdist(procs, work):
    cfg = os.path.join(work, "dnsdist.conf")
    port = PORTS["dnsdist"]
    with open(cfg, "w") as f:
        # One UDP listener thread (dnsdist's default): on this 2-core machine it
        # measured faster than two reusePort listeners (54-55k vs 42-48k qps).
        f.write(f"""setLocal("127.0.0.1:{port}", {{reusePort=true}})
controlSocket("127.0.0.1:{DNSDIST_CONSOLE}")
setKey("{DNSDIST_KEY}")
setServerPolicy(leastOutstanding)
setMaxTCPClientThreads(2)
{dnsdist_server(B1, "a1")}
{dnsdist_server(B2, "a2")}
""")
    p = procs.start("dnsdist", ["dnsdist", "--supervised", "--disable-syslog", "-C", cfg],
                    stdout=open(os.path.join(work, "dnsdist.log"), "w"), stderr=subprocess.STDOUT)
    wait_dns(port)
    return [p.pid]


def start_c(procs, work, name, args):
    """Builds bench/NAME.c with the system C compiler and starts it with `args`."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if not cc:
        raise RuntimeError(f"no C compiler for bench/{name}.c")
    exe = os.path.join(work, name)
    if not os.path.exists(exe):
        subprocess.run([cc, "-O2", "-o", exe, os.path.join(ROOT, f"bench/{name}.c")], check=True)
    return procs.start(name, [exe] + [str(x) for x in args])


def start_floor(procs, work):
    """The floor relay (bench/floor-relay.c)."""
    p = start_c(procs, work, "floor-relay", [PORTS["floor"], B1, B2])
    wait_dns(PORTS["floor"])
    return [p.pid]


def start_echo(procs, work, port):
    p = start_c(procs, work, "echo-backend", [port])
    wait_dns(port)
    return p


def dnsdist_console(work, cmd):
    cfg = os.path.join(work, "dnsdist.conf")
    return subprocess.run(["dnsdist", "-C", cfg, "-c", f"127.0.0.1:{DNSDIST_CONSOLE}", "-e", cmd],
                          capture_output=True, text=True, timeout=10)


NGINX_CONF = """worker_processes 2;
pid {work}/nginx.pid;
error_log {work}/nginx-error.log warn;
load_module {module};
events {{ worker_connections 10000; }}
stream {{
    upstream dns_udp {{ {upstream} }}
    upstream dns_tcp {{ {upstream} }}
    server {{
        listen 127.0.0.1:{port} udp reuseport;
        proxy_pass dns_udp;
        proxy_responses 1;
        proxy_timeout 2s;
    }}
    server {{
        listen 127.0.0.1:{port} reuseport;
        proxy_pass dns_tcp;
    }}
}}
"""


def nginx_module():
    for p in ["/usr/lib/nginx/modules/ngx_stream_module.so", "/usr/share/nginx/modules/ngx_stream_module.so"]:
        if os.path.exists(p):
            return p
    raise RuntimeError("nginx stream module not found (apt-get install libnginx-mod-stream)")


def write_nginx_conf(work, order):
    upstream = " ".join(f"server 127.0.0.1:{p};" for p in order)
    with open(os.path.join(work, "nginx.conf"), "w") as f:
        f.write(NGINX_CONF.format(work=work, module=nginx_module(), upstream=upstream, port=PORTS["nginx"]))


def start_nginx(procs, work):
    write_nginx_conf(work, [B1, B2])
    procs.start("nginx", ["nginx", "-g", "daemon off;", "-p", work, "-c", os.path.join(work, "nginx.conf")],
                stdout=subprocess.DEVNULL, stderr=open(os.path.join(work, "nginx.log"), "w"))
    wait_dns(PORTS["nginx"])
    if not ECHO:
        wait_dns(PORTS["nginx"], tcp=True)
    return None  # pids are read from /proc at measuring time (workers change on reload)


def nginx_pids(work):
    master = int(open(os.path.join(work, "nginx.pid")).read().strip())
    kids = subprocess.run(["pgrep", "-P", str(master)], capture_output=True, text=True).stdout.split()
    return [master] + [int(k) for k in kids]


def interleaved(rounds, protos, targets):
    """(round, protocol, target) in the order measured: round k measures every target
    once before round k+1 starts, so a slow spell of this shared machine hits all
    targets alike instead of one. The floor relay is UDP only."""
    for k in range(rounds):
        for proto in protos:
            for t in targets:
                if not (t == "floor" and proto == "tcp"):
                    yield k, proto, t


def cpu_ticks(pids):
    total = 0
    for pid in pids:
        try:
            fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime + stime
        except FileNotFoundError:
            pass
    return total


def peak_rss_kib(pids):
    total = 0
    for pid in pids:
        for line in open(f"/proc/{pid}/status"):
            if line.startswith("VmHWM:"):
                total += int(line.split()[1])
    return total


def dnsperf(port, qfile, seconds, qps=None, tcp=False, clients=8, outstanding=200, verbose=False):
    args = ["dnsperf", "-s", "127.0.0.1", "-p", str(port), "-d", qfile, "-l", str(seconds),
            "-c", str(clients), "-T", "2", "-q", str(outstanding), "-t", "2"]
    if qps:
        args += ["-Q", str(qps)]
    if tcp:
        args += ["-m", "tcp"]
    if verbose:
        args += ["-v"]
    out = subprocess.run(args, capture_output=True, text=True).stdout
    res = {"cmd": " ".join(args)}
    for key, pat in [("sent", r"Queries sent:\s+(\d+)"), ("completed", r"Queries completed:\s+(\d+)"),
                     ("lost", r"Queries lost:\s+(\d+)"), ("qps", r"Queries per second:\s+([\d.]+)")]:
        m = re.search(pat, out)
        res[key] = float(m.group(1)) if m else 0.0
    m = re.search(r"SERVFAIL (\d+)", out)
    res["servfail"] = int(m.group(1)) if m else 0
    if verbose:
        lat = [float(m.group(1)) for m in re.finditer(r"^> \S+ .* ([\d.]+)$", out, re.M)]
        res["latencies"] = sorted(lat)
    return res


def fmt_us(v, sign=False):
    """A latency in µs for the table; None (the percentile fell on an unanswered
    query, see lb/examples/latency.rs) prints as "lost"."""
    if v is None:
        return "lost"
    return f"{v:+.0f}" if sign else f"{v:.0f}"


def added(r, base, k):
    if r.get(k) is None or base.get(k) is None:
        return "—"
    return fmt_us(r[k] - base[k], sign=True)


def pct(sorted_values, p):
    if not sorted_values:
        return float("nan")
    i = min(len(sorted_values) - 1, int(round(p / 100.0 * (len(sorted_values) - 1))))
    return sorted_values[i]


def http(method, url, body=None):
    req = urllib.request.Request(url, method=method, data=json.dumps(body).encode() if body is not None else None,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read())


def cutovers(name, work, qfile, swaps, qps):
    """Runs dnsperf at `qps` while doing `swaps` cut-overs; returns dnsperf's result."""
    seconds = max(8, int(swaps * 0.25) + 4)
    port = PORTS[name]
    box = {}

    def load():
        box["r"] = dnsperf(port, qfile, seconds, qps=qps, clients=4)

    import threading
    t = threading.Thread(target=load)
    t.start()
    time.sleep(1.0)
    for i in range(swaps):
        if name == "dnslb":
            g = http("GET", f"http://127.0.0.1:{DNSLB_ADMIN}/v1/backends")["generation"]
            order = [B1, B2] if i % 2 else [B2, B1]
            http("PUT", f"http://127.0.0.1:{DNSLB_ADMIN}/v1/backends", {
                "backends": [{"name": f"s{i}a", "address": f"127.0.0.1:{order[0]}"},
                             {"name": f"s{i}b", "address": f"127.0.0.1:{order[1]}"}],
                "expected_generation": g})
        elif name == "nginx":
            write_nginx_conf(work, [B1, B2] if i % 2 else [B2, B1])
            subprocess.run(["nginx", "-p", work, "-c", os.path.join(work, "nginx.conf"), "-s", "reload"], check=True,
                           capture_output=True)
        elif name == "dnsdist":
            # Replace the first server: remove it, add it back (as an operator swapping a backend).
            r = dnsdist_console(work, f'rmServer(0) {dnsdist_server(B1 if i % 2 else B2, f"s{i}")}')
            if r.returncode != 0:
                log(f"  dnsdist console: {r.stdout} {r.stderr}")
        time.sleep(0.2)
    t.join()
    return box["r"]


KEEP_MARKER = "<!-- Everything below is kept by bench/harness.py when it rewrites this file. -->"


def machine():
    cpu = "unknown"
    for line in open("/proc/cpuinfo"):
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    return cpu, os.cpu_count()


def versions():
    v = {}
    v["dnslb"] = subprocess.run([DNSLB, "--version"], capture_output=True, text=True).stdout.strip()
    v["dnsdist"] = subprocess.run(["dnsdist", "--version"], capture_output=True, text=True).stdout.splitlines()[0]
    v["nginx"] = subprocess.run(["nginx", "-v"], capture_output=True, text=True).stderr.strip()
    named = shutil.which("named") or "/usr/sbin/named"
    v["bind"] = subprocess.run([named, "-v"], capture_output=True, text=True).stdout.strip()
    h = subprocess.run(["dnsperf", "-h"], capture_output=True, text=True)
    v["dnsperf"] = next((l for l in (h.stdout + h.stderr).splitlines() if l.startswith("Version")), "dnsperf (version unknown)")
    return v


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--seconds", type=int, default=5)
    ap.add_argument("--rate", type=int, default=20000, help="fixed rate for CPU and latency")
    ap.add_argument("--rss-rate", type=int, default=50000)
    ap.add_argument("--swaps", type=int, default=40)
    ap.add_argument("--note", default="", help="a paragraph added under the table")
    ap.add_argument("--swap-rate", type=int, default=10000)
    ap.add_argument("--targets", default="bind,floor,dnslb,dnsdist,nginx")
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--backend", choices=["bind", "echo"], default="bind",
                    help="echo: bench/echo-backend.c instead of named, UDP only, to read what "
                         "each proxy adds without BIND's own pauses (prints, never writes the doc)")
    a = ap.parse_args()
    global ECHO
    ECHO = a.backend == "echo"
    if ECHO:
        a.no_write = True
    protos = ["udp"] if ECHO else ["udp", "tcp"]
    targets = a.targets.split(",")
    work = tempfile.mkdtemp(prefix="dnslb-bench-")
    qfile = os.path.join(work, "queries.txt")
    with open(qfile, "w") as f:
        f.write("\n".join(QUERIES) + "\n")
    procs = Procs()
    results = {}
    try:
        log("== backends")
        start = start_echo if ECHO else start_named
        bind_pids = [start(procs, work, B1).pid, start(procs, work, B2).pid]
        pids = {"bind": lambda: [bind_pids[0]]}
        if "dnslb" in targets:
            p = start_dnslb(procs, work)
            pids["dnslb"] = lambda p=p: p
        if "dnsdist" in targets:
            p = start_dnsdist(procs, work)
            pids["dnsdist"] = lambda p=p: p
        if "nginx" in targets:
            start_nginx(procs, work)
            pids["nginx"] = lambda: nginx_pids(work)
        if "floor" in targets:
            p = start_floor(procs, work)
            pids["floor"] = lambda p=p: p
        time.sleep(2)  # health checks settle
        # Maximum throughput, median of interleaved rounds (runs swing by 20 % and more).
        log(f"== maximum throughput, {a.rounds} interleaved rounds")
        runs = {}
        for k, proto, t in interleaved(a.rounds, protos, targets):
            if proto == "tcp":
                x = dnsperf(PORTS[t], qfile, a.seconds, tcp=True, clients=32, outstanding=64)
            else:
                x = dnsperf(PORTS[t], qfile, a.seconds)
            runs.setdefault((t, proto), []).append(x)
            log(f"  round {k + 1} {t} {proto.upper()}: {x['qps']:.0f} qps (SERVFAIL {x['servfail']})")
        for t in targets:
            # SERVFAIL answers over every load run: dnsperf counts them as answered.
            results[t] = {"servfail": sum(x["servfail"] for p in protos for x in runs.get((t, p), []))}
            for proto in ["udp", "tcp"]:
                xs = runs.get((t, proto))
                if xs:
                    results[t][f"{proto}_qps"] = statistics.median(x["qps"] for x in xs)
                    results[t][f"{proto}_cmd"] = xs[0]["cmd"]
        for t in targets:
            if t == "floor":  # UDP throughput and CPU only
                continue
            port = PORTS[t]
            r = results[t]
            log(f"== {t} (port {port})")
            rss_run = dnsperf(port, qfile, a.seconds, qps=a.rss_rate, clients=8)
            r["rss_kib"] = peak_rss_kib(pids[t]())
            r["servfail"] += rss_run["servfail"]
            log(f"  peak RSS after {a.rss_rate} qps: {r['rss_kib'] / 1024:.1f} MiB (answered {rss_run['completed']:.0f})")
            if t != "bind":
                c = cutovers(t, work, qfile, a.swaps, a.swap_rate)
                r["cutover_lost"] = c["lost"]
                r["cutover_servfail"] = c["servfail"]
                r["cutover_sent"] = c["sent"]
                r["cutover_cmd"] = c["cmd"]
                log(f"  {a.swaps} cut-overs at {a.swap_rate} qps: sent {c['sent']:.0f}, lost {c['lost']:.0f}, "
                    f"SERVFAIL {c['servfail']}")
        # Latency at a fixed rate, interleaved too: a p99 over one 5 s window is mostly
        # the luck of that window on this VM. Median of the rounds, percentile by
        # percentile (a percentile that fell on an unanswered query counts as infinite).
        log(f"== latency at {a.rate} qps, {a.rounds} interleaved rounds")
        lats = {}
        for k, _, t in interleaved(a.rounds, ["udp"], [t for t in targets if t != "floor"]):
            probe = [PROBE, f"127.0.0.1:{PORTS[t]}", str(a.rate), str(a.seconds)]
            lat = json.loads(subprocess.run(probe, capture_output=True, text=True, check=True).stdout)
            lats.setdefault(t, []).append(lat)
            results[t]["servfail"] += lat["servfail"]
            results[t]["lat_cmd"] = " ".join(probe).replace(ROOT + "/", "")
            log(f"  round {k + 1} {t}: p50 {fmt_us(lat['p50_us'])} us, p90 {fmt_us(lat['p90_us'])} us, "
                f"p99 {fmt_us(lat['p99_us'])} us ({lat['answered']} of {lat['sent']} answered, "
                f"{lat['servfail']} SERVFAIL)")
        for t, xs in lats.items():
            for key in ["p50_us", "p90_us", "p99_us"]:
                m = statistics.median(float("inf") if x[key] is None else x[key] for x in xs)
                results[t][key] = None if m == float("inf") else m
        # CPU per query at a fixed rate, median of interleaved rounds.
        log(f"== CPU per query at {a.rate} qps, {a.rounds} interleaved rounds")
        samples = {}
        for k, proto, t in interleaved(a.rounds, protos, targets):
            before = cpu_ticks(pids[t]())
            fixed = dnsperf(PORTS[t], qfile, a.seconds, qps=a.rate, tcp=proto == "tcp", clients=8)
            ticks = cpu_ticks(pids[t]()) - before
            us = ticks / os.sysconf("SC_CLK_TCK") * 1e6 / max(fixed["completed"], 1)
            samples.setdefault((t, proto), []).append(us)
            results[t]["servfail"] += fixed["servfail"]
            log(f"  round {k + 1} {t} {proto.upper()}: {us:.1f} us/query "
                f"({fixed['completed']:.0f} answered, lost {fixed['lost']:.0f}, "
                f"SERVFAIL {fixed['servfail']})")
        for (t, proto), xs in samples.items():
            results[t][f"{proto}_cpu_us"] = statistics.median(xs)
    finally:
        procs.stop_all()
        if os.path.exists(os.path.join(work, "nginx.pid")):
            subprocess.run(["nginx", "-p", work, "-c", os.path.join(work, "nginx.conf"), "-s", "stop"],
                           capture_output=True)
    with open(os.path.join(work, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    log(f"raw results: {work}/results.json")
    report(results, a, targets)


def report(results, a, targets):
    cpu, cores = machine()
    base = results.get("bind", {})
    lines = []
    lines.append("| target | UDP max qps | TCP max qps | UDP CPU µs/query | TCP CPU µs/query | p50 µs | p90 µs "
                 "| p99 µs | added p50 / p90 / p99 µs | peak RSS MiB | lost in cut-overs | SERVFAIL answers |")
    lines.append("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for t in targets:
        r = results.get(t)
        if not r:
            continue
        if t == "floor":
            lines.append(f"| floor (C relay) | {r['udp_qps']:.0f} | — | {r['udp_cpu_us']:.1f} | — | — | — | — | — | — | — "
                         f"| {r.get('servfail', 0)} |")
            continue
        if t == "bind":
            added_ = "—"
        else:
            added_ = " / ".join(added(r, base, k) for k in ["p50_us", "p90_us", "p99_us"])
        cut = "—" if t == "bind" else f"{r['cutover_lost']:.0f} of {r['cutover_sent']:.0f} (SERVFAIL {r['cutover_servfail']})"
        name = "echo (direct)" if t == "bind" and ECHO else t
        tcp_qps, tcp_cpu = (f"{r['tcp_qps']:.0f}", f"{r['tcp_cpu_us']:.1f}") if "tcp_qps" in r else ("—", "—")
        lines.append(f"| {name} | {r['udp_qps']:.0f} | {tcp_qps} | {r['udp_cpu_us']:.1f} | {tcp_cpu} "
                     f"| {fmt_us(r['p50_us'])} | {fmt_us(r['p90_us'])} | {fmt_us(r['p99_us'])} | {added_} | {r['rss_kib'] / 1024:.1f} | {cut} "
                     f"| {r.get('servfail', 0)} |")
    ratios = []
    if "dnslb" in results and "dnsdist" in results:
        d, x = results["dnslb"], results["dnsdist"]
        ratios.append(f"- UDP throughput dnslb/dnsdist: **{d['udp_qps'] / x['udp_qps']:.2f}×** (target ≥ 1.4×)")
        ratios.append(f"- UDP CPU per query dnslb/dnsdist: **{d['udp_cpu_us'] / x['udp_cpu_us']:.2f}×** (target ≤ 0.33×)")
        if "floor" in results:
            f_ = results["floor"]["udp_cpu_us"]
            ratios.append(f"- UDP CPU per query of the floor relay/dnsdist: **{f_ / x['udp_cpu_us']:.2f}×**; "
                          f"dnslb/floor: **{d['udp_cpu_us'] / f_:.2f}×**")
    if "dnslb" in results and "nginx" in results and "tcp_qps" in results["dnslb"]:
        d, n = results["dnslb"], results["nginx"]
        ratios.append(f"- TCP throughput dnslb/nginx: **{d['tcp_qps'] / n['tcp_qps']:.2f}×** (target ≥ 1.2×)")
        ratios.append(f"- TCP CPU per query dnslb/nginx: **{d['tcp_cpu_us'] / n['tcp_cpu_us']:.2f}×** (target ≤ 0.8×)")
    if "dnslb" in results and "bind" in results:
        d = results["dnslb"]
        ratios.append(f"- added latency at {a.rate} qps, p50 / p90 / p99: **{added(d, base, 'p50_us')} / "
                      f"{added(d, base, 'p90_us')} / {added(d, base, 'p99_us')} µs** "
                      f"(target ≤ 100 µs); peak RSS at {a.rss_rate} qps: **{results['dnslb']['rss_kib'] / 1024:.1f} MiB** "
                      f"(target ≤ 20 MiB); lost across {a.swaps} swaps: **{results['dnslb']['cutover_lost']:.0f}**")
    table = "\n".join(lines)
    print(table)
    print("\n".join(ratios))
    if a.no_write:
        return
    v = versions()
    any_r = next(iter(results.values()))
    doc = f"""# Benchmarks

dnslb against dnsdist and nginx `stream`, in front of the same two BIND backends, and BIND
queried directly, all on loopback on one machine, in one run, measured with dnsperf.
Absolute numbers swing by tens of percent between runs on a shared 2-core machine; compare
ratios within one run.

## Latest run

- date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}
- machine: {cpu}, {cores} cores, {platform.system()} {platform.release()}
- versions: {v['dnslb']}; {v['dnsdist']}; {v['nginx']}; {v['bind']}; dnsperf {v['dnsperf']}
- command: `bench/run` (= `python3 bench/harness.py --rounds {a.rounds} --seconds {a.seconds} --rate {a.rate} --rss-rate {a.rss_rate} --swaps {a.swaps} --swap-rate {a.swap_rate}`)

{table}

{chr(10).join(ratios)}

{a.note}

## How each number is measured

- Backends: two `named -n 1` (one worker thread each) on 127.0.0.1:{B1} and :{B2}, serving
  `ansible/zones/example.test.zone`. "bind" is the first of them queried directly.
- dnslb: release build, default threads (UDP: half the cores rounded up, so one here;
  TCP: one per core), least-outstanding. dnsdist: one UDP listener (its
  default; measured faster here than two `reusePort` listeners), `leastOutstanding`,
  SOA health checks. nginx: 2 workers, `listen … udp reuseport`, `proxy_responses 1`,
  and a TCP server on the same port.
- floor: `bench/floor-relay.c`, a 70-line single-threaded C relay (poll, recvfrom,
  sendto; no parsing, no ID rewriting; queries alternate between the two backends). It is what forwarding alone costs
  a separate process on this machine, and no proxy can be much cheaper per query.
- UDP / TCP max: median of {a.rounds} rounds, interleaved (each round measures every
  target once), of `{any_r['udp_cmd']}` (TCP: `{any_r['tcp_cmd']}`).
- CPU µs/query: utime+stime of the target's processes (from /proc) over a {a.seconds} s
  dnsperf run at a fixed {a.rate} qps (`-c 8`), divided by the queries answered; median
  of {a.rounds} rounds, interleaved (each round measures every target once).
- p50/p90/p99: `lb/examples/latency.rs`, a probe that sends each query at its own
  scheduled time ({a.rate} qps, no bursts) and times every answer by ID; percentiles
  are over every query sent, an unanswered one counting as slower than any answer
  ("lost" where a percentile lands on one). Median of {a.rounds} interleaved rounds,
  percentile by percentile
  (`{any_r['lat_cmd']}`); "added" is the difference to BIND queried directly in the
  same run. On this shared VM the p99 of every target, BIND included, is dominated by
  scheduling stalls of several milliseconds; p50 and p90 are the stable figures.
- peak RSS: VmHWM of the target's processes after a {a.rss_rate} qps run.
- SERVFAIL answers: over every throughput round, CPU round, the latency probe and
  the RSS run.
  dnsperf counts a SERVFAIL as an answered query, and a proxy's own SERVFAIL is cheap
  and fast, so throughput, CPU and latency figures only count when this is 0.
- cut-overs: {a.swaps} changes under a steady {a.swap_rate} qps dnsperf load, one every
  ~0.2 s: dnslb `PUT /v1/backends` (with expected_generation) alternating between two
  sets, `nginx -s reload` alternating two upstream orders, dnsdist `rmServer(0)` +
  `newServer(...)` through its console. "lost" is dnsperf's count of unanswered queries.
"""
    path = os.path.join(ROOT, "docs/benchmarks.md")
    # Hand-written analysis and earlier runs below the marker are kept.
    try:
        old = open(path).read()
        if KEEP_MARKER in old:
            doc += "\n" + old[old.index(KEEP_MARKER):]
    except FileNotFoundError:
        pass
    with open(path, "w") as f:
        f.write(doc)
    log("wrote docs/benchmarks.md")


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    main()
