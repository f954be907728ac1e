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
import resource
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
PORTS = {"bind": B1, "dnslb": 15353, "dnsdist": 15354, "nginx": 15355, "floor": 15356, "kernel": 15357,
         "dnslb-cached": 15358, "dnsdist-cached": 15359}
# Reference rows, not competitors: maximum throughput and CPU per query only.
REFERENCES = ("floor", "kernel")
ADMIN = {"dnslb": 15380, "dnslb-cached": 15381}
CONSOLE = {"dnsdist": 15399, "dnsdist-cached": 15398}
# The packet caches of the cached rows: the same number of entries for both, and for
# the RSS figure, that many distinct names asked (each a wildcard answer).
CACHE_ENTRIES = 100000
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


def dnslb_cache_entries():
    """`[cache] max_entries` that gives dnslb's UDP workers CACHE_ENTRIES between them:
    they hold three quarters of it (lb/src/shared.rs, CacheShare)."""
    return CACHE_ENTRIES * 4 // 3 + 1


def start_dnslb(procs, work, name="dnslb"):
    cfg = os.path.join(work, f"{name}.toml")
    cache = f"[cache]\nmax_entries = {dnslb_cache_entries()}\nmax_ttl_s = 86400\n" if name.endswith("-cached") else ""
    with open(cfg, "w") as f:
        f.write(f"""[listen]
dns = ["127.0.0.1:{PORTS[name]}"]
admin = "127.0.0.1:{ADMIN[name]}"
{cache}[state]
path = "{work}/{name}-state.json"
[balance]
policy = "least-outstanding"
[health]
query_name = "example.test."
[tcp]
max_connections = 10000
# Every benchmark client is 127.0.0.1: the per-client cap (20 by default) would refuse
# dnsperf's 32 TCP connections beyond the 20th, and dnsperf does not reconnect when a
# connection is closed after max_queries_per_connection (10000 by default; a cached
# run makes that many in 3 s) with queries of its own still unread.
max_connections_per_client = 10000
max_queries_per_connection = 100000000
[[backend]]
name = "a1"
address = "127.0.0.1:{B1}"
[[backend]]
name = "a2"
address = "127.0.0.1:{B2}"
""")
    p = procs.start(name, [DNSLB, "--config", cfg], stdout=subprocess.DEVNULL,
                    stderr=open(os.path.join(work, f"{name}.log"), "w"))
    wait_dns(PORTS[name])
    return [p.pid]


DNSDIST_KEY = "bXlzZWNyZXRrZXlmb3J0aGViZW5jaG1hcmsxMjM0NTY="


def dnsdist_server(port, name):
    # The echo backend answers the check with no records, which mustResolve fails.
    must = "" if ECHO else ", mustResolve=true"
    return (f'newServer({{address="127.0.0.1:{port}", name="{name}", checkName="example.test.", '
            f'checkType="SOA"{must}}})')


def start_dnsdist(procs, work, name="dnsdist"):
    cfg = os.path.join(work, f"{name}.conf")
    port = PORTS[name]
    # Its packet cache as dnslb's: the same entries, TTLs not aged (dontAge).
    cache = (f'pc = newPacketCache({CACHE_ENTRIES}, {{maxTTL=86400, dontAge=true}})\n'
             'getPool(""):setCache(pc)\n') if name.endswith("-cached") else ""
    with open(cfg, "w") as f:
        # One UDP listener thread (dnsdist's default): on this 2-core machine it
        # measured faster than two reusePort listeners (54-55k vs 42-48k qps).
        f.write(f"""setLocal("127.0.0.1:{port}", {{reusePort=true}})
controlSocket("127.0.0.1:{CONSOLE[name]}")
setKey("{DNSDIST_KEY}")
setServerPolicy(leastOutstanding)
setMaxTCPClientThreads(2)
{dnsdist_server(B1, "a1")}
{dnsdist_server(B2, "a2")}
{cache}""")
    p = procs.start(name, ["dnsdist", "--supervised", "--disable-syslog", "-C", cfg],
                    stdout=open(os.path.join(work, f"{name}.log"), "w"), stderr=subprocess.STDOUT)
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


def start_floor(procs, work, tcp):
    """The floor relays (bench/floor-relay.c, and bench/floor-tcp-relay.c on the same
    port if `tcp`); their pids."""
    p = start_c(procs, work, "floor-relay", [PORTS["floor"], B1, B2])
    wait_dns(PORTS["floor"])
    if not tcp:
        return [p.pid]
    q = start_c(procs, work, "floor-tcp-relay", [PORTS["floor"], B1, B2])
    wait_dns(PORTS["floor"], tcp=True)
    return [p.pid, q.pid]


def start_kernel(procs, work, tcp):
    """The kernel floor: bench/kernel-relay.bpf.c, a tc program on the loopback device
    that forwards UDP queries to PORTS["kernel"] and their answers in the kernel, and if
    `tcp`, bench/kernel-tcp-relay.c on the same port, whose connections a BPF sockhash
    splices. Returns (a function that detaches the tc program, the TCP relay's pids),
    or (None, None) with the reason logged where it cannot be built or attached: no
    clang or libbpf, no root, no BPF."""
    multiarch = subprocess.run(["gcc", "-print-multiarch"], capture_output=True, text=True).stdout.strip()

    def bpf(name, *defines):
        obj = os.path.join(work, f"{name}.bpf.o")
        return obj, ["clang", "-O2", "-g", "-target", "bpf", f"-I/usr/include/{multiarch}", *defines,
                      "-c", os.path.join(ROOT, f"bench/{name}.bpf.c"), "-o", obj]

    udp_obj, build_udp = bpf("kernel-relay", f"-DLB_PORT={PORTS['kernel']}", f"-DB1={B1}", f"-DB2={B2}")
    tcp_obj, build_tcp = bpf("kernel-tcp-relay")
    relay = os.path.join(work, "kernel-tcp-relay")
    build_relay = ["cc", "-O2", "-o", relay, os.path.join(ROOT, "bench/kernel-tcp-relay.c"), "-lbpf"]
    had_clsact = "clsact" in subprocess.run(["tc", "qdisc", "show", "dev", "lo"], capture_output=True,
                                            text=True).stdout
    steps = [build_udp] + ([build_tcp, build_relay] if tcp else []) + \
        ([] if had_clsact else [["tc", "qdisc", "add", "dev", "lo", "clsact"]]) + [
        ["tc", "filter", "add", "dev", "lo", "ingress", "pref", "4901", "bpf", "direct-action",
         "obj", udp_obj, "sec", "tc"]]

    def detach():
        subprocess.run(["tc", "filter", "del", "dev", "lo", "ingress", "pref", "4901"], capture_output=True)
        if not had_clsact:
            subprocess.run(["tc", "qdisc", "del", "dev", "lo", "clsact"], capture_output=True)

    for step in steps:
        log(f"  {' '.join(step)}")
        try:
            r = subprocess.run(step, capture_output=True, text=True)
        except FileNotFoundError as e:
            r = subprocess.CompletedProcess(step, 1, "", str(e))
        if r.returncode != 0:
            log(f"  kernel floor left out: {r.stderr.strip()[-300:]}")
            detach()
            return None, None
    p = procs.start("kernel-tcp-relay", [relay, tcp_obj, str(PORTS["kernel"]), str(B1), str(B2)]) if tcp else None
    try:
        wait_dns(PORTS["kernel"])
        if p:
            wait_dns(PORTS["kernel"], tcp=True)
    except BaseException as e:
        detach()
        if p:
            p.terminate()
        if not isinstance(e, Exception):
            raise
        log(f"  kernel floor left out: {e}")
        return None, None
    return detach, [p.pid] if p else []


def start_echo(procs, work, port):
    p = start_c(procs, work, "echo-backend", [port])
    wait_dns(port)
    return p


def dnsdist_console(work, cmd, name="dnsdist"):
    cfg = os.path.join(work, f"{name}.conf")
    return subprocess.run(["dnsdist", "-C", cfg, "-c", f"127.0.0.1:{CONSOLE[name]}", "-e", cmd],
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
    targets alike instead of one."""
    for k in range(rounds):
        for proto in protos:
            for t in targets:
                yield k, proto, t


def cpu_ticks(pids):
    total = 0
    for pid in pids:
        try:
            fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime + stime
        except (FileNotFoundError, ProcessLookupError):  # gone since listed
            pass
    return total


def ticks_by_pid():
    """utime+stime of every process and kernel thread but this one, by pid."""
    out = {}
    for p in os.listdir("/proc"):
        if p.isdigit() and int(p) != os.getpid():
            t = cpu_ticks([int(p)])
            if t:
                out[int(p)] = t
    return out


def ticks_between(before, after, pids=None):
    """CPU ticks spent between two ticks_by_pid() snapshots, by `pids` or by every
    process: one started in between counts whole, one that ended in between is not
    counted (its last ticks are unknown; dnsperf, which ends, is counted through
    rusage). /proc/stat would be simpler, but on this VM its busy time undercounts
    what the processes report (docs/benchmarks.md)."""
    return sum(t - before.get(pid, 0) for pid, t in after.items()
               if t >= before.get(pid, 0) and (pids is None or pid in pids))


def children_cpu_s():
    """CPU seconds of this process's children that have been waited for (dnsperf)."""
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def status_kib(pids, field):
    """A KiB field of /proc/<pid>/status (VmRSS, VmHWM), summed over `pids`."""
    total = 0
    for pid in pids:
        for line in open(f"/proc/{pid}/status"):
            if line.startswith(field + ":"):
                total += int(line.split()[1])
    return total


def rss_kib(pids):
    """Resident memory now, summed over `pids`."""
    return status_kib(pids, "VmRSS")


def cached_entries(work, t):
    """Answers in target `t`'s packet cache: dnslb's metric, dnsdist's printStats()."""
    if t in ADMIN:
        with urllib.request.urlopen(f"http://127.0.0.1:{ADMIN[t]}/metrics", timeout=10) as r:
            text = r.read().decode()
        m = re.search(r"^dnslb_cache_entries (\S+)$", text, re.M)
        return int(float(m.group(1))) if m else None
    out = dnsdist_console(work, 'getPool(""):getCache():printStats()', t).stdout
    m = re.search(r"Entries: (\d+)", out)
    return int(m.group(1)) if m else None


def restart(procs, work, t):
    """Stops target `t` and starts it afresh; its pids."""
    for name, p in procs.procs:
        if name == t and p.poll() is None:
            p.terminate()
            p.wait(timeout=10)
    return (start_dnslb if t in ADMIN else start_dnsdist)(procs, work, t)


def fill_caches(work, cached, pids, procs):
    """Restarts each cached target (so that what earlier runs made it allocate does not
    count), asks it CACHE_ENTRIES distinct names once (wildcard answers, each an entry
    of its own), then reads how many it holds and its resident memory."""
    names = os.path.join(work, "distinct.txt")
    with open(names, "w") as f:
        f.write("".join(f"n{i}.wild.example.test A\n" for i in range(CACHE_ENTRIES)))
    out = {}
    for t in cached:
        fresh = restart(procs, work, t)
        pids[t] = lambda p=fresh: p
        time.sleep(2)  # health checks settle
        before = rss_kib(pids[t]())
        args = ["dnsperf", "-s", "127.0.0.1", "-p", str(PORTS[t]), "-d", names, "-n", "1",
                "-c", "8", "-T", "2", "-q", "100", "-t", "2", "-Q", "20000"]
        run = subprocess.run(args, capture_output=True, text=True).stdout
        m = re.search(r"Queries completed:\s+(\d+)", run)
        time.sleep(1)
        out[t] = {"cache_rss_before_kib": before, "cache_rss_kib": rss_kib(pids[t]()),
                  "cache_entries": cached_entries(work, t), "cache_fill_answered": int(m.group(1)) if m else 0,
                  "cache_fill_cmd": " ".join(args).replace(work, "$WORK")}
        log(f"  {t}: {out[t]['cache_entries']} entries after {out[t]['cache_fill_answered']} distinct names; "
            f"RSS {before / 1024:.1f} -> {out[t]['cache_rss_kib'] / 1024:.1f} MiB")
    return out


def peak_rss_kib(pids):
    """Peak resident memory, summed over `pids`."""
    return status_kib(pids, "VmHWM")


def dnsperf_args(port, qfile, seconds, qps=None, tcp=False, clients=8, outstanding=200, verbose=False):
    args = ["dnsperf", "-s", "127.0.0.1", "-p", str(port), "-d", qfile, "-l", str(seconds),
            "-c", str(clients), "-T", "2", "-q", str(outstanding), "-t", "2"]
    if qps:
        args += ["-Q", str(qps)]
    if tcp:
        args += ["-m", "tcp"]
    if verbose:
        args += ["-v"]
    return args


def dnsperf(port, qfile, seconds, qps=None, tcp=False, clients=8, outstanding=200, verbose=False):
    args = dnsperf_args(port, qfile, seconds, qps, tcp, clients, outstanding, verbose)
    out = subprocess.run(args, capture_output=True, text=True).stdout
    res = {"cmd": " ".join(args)}
    for key, pat in [("sent", r"Queries sent:\s+(\d+)"), ("completed", r"Queries completed:\s+(\d+)"),
                     ("lost", r"Queries lost:\s+(\d+)"), ("qps", r"Queries per second:\s+([\d.]+)")]:
        m = re.search(pat, out)
        res[key] = float(m.group(1)) if m else 0.0
    m = re.search(r"SERVFAIL (\d+)", out)
    res["servfail"] = int(m.group(1)) if m else 0
    m = re.search(r"Average Latency \(s\):\s+([\d.]+)", out)  # queries (the second one is connects)
    res["avg_latency_us"] = float(m.group(1)) * 1e6 if m else None
    if verbose:
        lat = [float(m.group(1)) for m in re.finditer(r"^> \S+ .* ([\d.]+)$", out, re.M)]
        res["latencies"] = sorted(lat)
    return res


MALLOC_EVENT = "probe_libc:malloc"


def malloc_probe():
    """Adds a uprobe on the C library's malloc (perf probe) and returns its event name,
    or None where perf or uprobes are not available (the count is then left out)."""
    perf = shutil.which("perf")
    if not perf:
        return None
    out = subprocess.run(["ldd", DNSLB], capture_output=True, text=True).stdout
    m = re.search(r"libc\.so\.6 => (\S+)", out)
    if not m:
        return None
    subprocess.run([perf, "probe", "-q", "-x", m.group(1), "malloc"], capture_output=True)
    listed = subprocess.run([perf, "probe", "-l"], capture_output=True, text=True).stdout
    return MALLOC_EVENT if MALLOC_EVENT in listed else None


def remove_malloc_probe():
    if shutil.which("perf"):
        subprocess.run(["perf", "probe", "-q", "-d", MALLOC_EVENT], capture_output=True)


def mallocs_per_query(pids, port, qfile, rate, tcp):
    """malloc calls in `pids` per query sent, over 3 s of a steady `rate` load."""
    seconds = 3
    load = subprocess.Popen(dnsperf_args(port, qfile, seconds + 2, qps=rate, tcp=tcp),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(1)
    out = subprocess.run(["perf", "stat", "-x", ",", "-e", MALLOC_EVENT, "-p", ",".join(map(str, pids)),
                          "--", "sleep", str(seconds)], capture_output=True, text=True).stderr
    load.wait()
    m = re.search(r"^(\d+),", out, re.M)
    return int(m.group(1)) / (rate * seconds) if m else None


def capture_residence(work, t, rate, seconds):
    """The latency probe with a name of its own per query against target `t`, under a
    tcpdump capture of loopback; returns bench/residence.py's figures for it, with
    the capture's own losses and the probe's result. Raises RuntimeError if tcpdump
    does not start."""
    import residence  # bench/residence.py, beside this file
    pcap = os.path.join("/dev/shm" if os.path.isdir("/dev/shm") else work, f"dnslb-bench-{t}.pcap")
    flt = f"udp and (port {PORTS[t]} or port {B1} or port {B2})"
    cap = subprocess.Popen(["tcpdump", "-i", "lo", "-n", "-s", "192", "-B", "131072",
                            "--time-stamp-precision=nano", "-w", pcap, flt],
                           stderr=subprocess.PIPE, text=True)
    probe = [PROBE, f"127.0.0.1:{PORTS[t]}", str(rate), str(seconds), "unique"]
    try:
        first = cap.stderr.readline()  # "listening on lo ...": the filter is in place
        if "listening on" not in first:
            raise RuntimeError(f"tcpdump did not start: {first.strip()} {cap.stderr.read().strip()}"[:300])
        lat = json.loads(subprocess.run(probe, capture_output=True, text=True, check=True).stdout)
        cap.send_signal(signal.SIGINT)
        err = cap.communicate(timeout=60)[1]
        m = re.search(r"(\d+) packets? dropped by kernel", err)
        res = residence.residence(pcap, PORTS[t], {B1, B2})
    finally:
        if cap.poll() is None:
            cap.kill()
            cap.wait()
        if os.path.exists(pcap):
            os.remove(pcap)
    res["capture_dropped"] = int(m.group(1)) if m else None
    res["probe"] = lat
    res["cmd"] = " ".join(probe).replace(ROOT + "/", "") + f" under tcpdump -i lo '{flt}'; bench/residence.py"
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
        if name in ADMIN:
            g = http("GET", f"http://127.0.0.1:{ADMIN[name]}/v1/backends")["generation"]
            order = [B1, B2] if i % 2 else [B2, B1]
            http("PUT", f"http://127.0.0.1:{ADMIN[name]}/v1/backends", {
                "backends": [{"name": f"s{i}a", "address": f"127.0.0.1:{order[0]}"},
                             {"name": f"s{i}b", "address": f"127.0.0.1:{order[1]}"}],
                "expected_generation": g})
        elif name == "nginx":
            write_nginx_conf(work, [B1, B2] if i % 2 else [B2, B1])
            subprocess.run(["nginx", "-p", work, "-c", os.path.join(work, "nginx.conf"), "-s", "reload"], check=True,
                           capture_output=True)
        elif name in CONSOLE:
            # Replace the first server: remove it, add it back (as an operator swapping a backend).
            r = dnsdist_console(work, f'rmServer(0) {dnsdist_server(B1 if i % 2 else B2, f"s{i}")}', name)
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
    ap.add_argument("--targets", default="bind,floor,kernel,dnslb,dnsdist,nginx,dnslb-cached,dnsdist-cached")
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
    detach_kernel = None
    try:
        log("== backends")
        start = start_echo if ECHO else start_named
        bind_pids = [start(procs, work, B1).pid, start(procs, work, B2).pid]
        pids = {"bind": lambda: [bind_pids[0]]}
        for t in ("dnslb", "dnslb-cached"):
            if t in targets:
                p = start_dnslb(procs, work, t)
                pids[t] = lambda p=p: p
        for t in ("dnsdist", "dnsdist-cached"):
            if t in targets:
                p = start_dnsdist(procs, work, t)
                pids[t] = lambda p=p: p
        if "nginx" in targets:
            start_nginx(procs, work)
            pids["nginx"] = lambda: nginx_pids(work)
        if "floor" in targets:
            p = start_floor(procs, work, "tcp" in protos)
            pids["floor"] = lambda p=p: p
        if "kernel" in targets:
            detach_kernel, kernel_pids = start_kernel(procs, work, "tcp" in protos)
            if detach_kernel:
                # UDP has no process (the senders' system calls do the work); TCP's only
                # accepts and connects (kernel threads do the splicing).
                pids["kernel"] = lambda p=kernel_pids: p
            else:
                targets.remove("kernel")
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
                    results[t][f"{proto}_qps_rounds"] = [x["qps"] for x in xs]
                    results[t][f"{proto}_cmd"] = xs[0]["cmd"]
        for t in targets:
            if t in REFERENCES:  # throughput and CPU only
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
        for k, _, t in interleaved(a.rounds, ["udp"], [t for t in targets if t not in REFERENCES]):
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
        # Time inside each proxy per query, from a capture: what the proxy itself adds,
        # without BIND's stalls (bench/residence.py). Three rounds: each is 400k packets.
        proxies = [t for t in targets if t not in REFERENCES and t != "bind"]
        if shutil.which("tcpdump") and proxies:
            rounds = min(a.rounds, 3)
            log(f"== time inside each proxy at {a.rate} qps (capture), {rounds} interleaved rounds")
            for k, _, t in interleaved(rounds, ["udp"], proxies):
                try:
                    res = capture_residence(work, t, a.rate, a.seconds)
                except RuntimeError as e:
                    log(f"  time inside each proxy left out: {e}")
                    break
                if res["capture_dropped"] != 0:
                    # A packet the capture missed would count as one the proxy lost.
                    log(f"  round {k + 1} {t}: left out, the capture dropped {res['capture_dropped']} packets")
                    continue
                results[t].setdefault("residence_rounds", []).append(res)
                results[t]["servfail"] += res["probe"]["servfail"]
                results[t]["residence_cmd"] = res["cmd"]
                log(f"  round {k + 1} {t}: inside p50 {fmt_us(res['p50_us'])} us, p90 {fmt_us(res['p90_us'])} us, "
                    f"p99 {fmt_us(res['p99_us'])} us, p99.9 {fmt_us(res['p999_us'])} us (of "
                    f"{res['probe']['sent']} sent: {res['complete']} whole, {res['lost_in_proxy']} lost in the proxy, "
                    f"{res['lost_behind']} behind it; capture dropped {res['capture_dropped']})")
            for t in proxies:
                xs = results[t].get("residence_rounds", [])
                for key in ["p50_us", "p90_us", "p99_us", "p999_us"]:
                    if xs:  # a round whose percentile fell on a lost query counts as slowest
                        m = statistics.median(float("inf") if x[key] is None else x[key] for x in xs)
                        results[t][f"inside_{key}"] = None if m == float("inf") else m
        else:
            log("  time inside each proxy left out: no tcpdump")
        # CPU per query at a fixed rate, median of interleaved rounds.
        log(f"== CPU per query at {a.rate} qps, {a.rounds} interleaved rounds")
        samples = {}
        machine_samples = {}
        for k, proto, t in interleaved(a.rounds, protos, targets):
            # The machine's share too: every process and kernel thread, and dnsperf.
            # Work a proxy moves into its peers' system calls (waking them, or the
            # kernel floor's forwarding) or into kernel threads shows here and not in
            # its own CPU.
            before, child_before = ticks_by_pid(), children_cpu_s()
            fixed = dnsperf(PORTS[t], qfile, a.seconds, qps=a.rate, tcp=proto == "tcp", clients=8)
            after, dnsperf_s = ticks_by_pid(), children_cpu_s() - child_before
            answered = max(fixed["completed"], 1)
            per_query = 1e6 / os.sysconf("SC_CLK_TCK") / answered
            us = ticks_between(before, after, set(pids[t]())) * per_query
            machine_us = ticks_between(before, after) * per_query + dnsperf_s * 1e6 / answered
            samples.setdefault((t, proto), []).append(us)
            machine_samples.setdefault((t, proto), []).append(machine_us)
            if fixed["avg_latency_us"] is not None:
                results[t].setdefault(f"{proto}_avg_latency_rounds", []).append(fixed["avg_latency_us"])
            results[t]["servfail"] += fixed["servfail"]
            # A target that loses queries at this rate works less per query sent, and
            # may pace its clients differently: the floor relay once lost 1-10 % and
            # looked 25 % cheaper than it is. Shown next to its CPU figures.
            results[t]["fixed_lost"] = results[t].get("fixed_lost", 0) + fixed["lost"]
            results[t]["fixed_sent"] = results[t].get("fixed_sent", 0) + fixed["sent"]
            log(f"  round {k + 1} {t} {proto.upper()}: {us:.1f} us/query (machine {machine_us:.1f}) "
                f"({fixed['completed']:.0f} answered, lost {fixed['lost']:.0f}, "
                f"SERVFAIL {fixed['servfail']})")
        for (t, proto), xs in samples.items():
            results[t][f"{proto}_cpu_us"] = statistics.median(xs)
            results[t][f"{proto}_cpu_us_rounds"] = xs
        for (t, proto), xs in machine_samples.items():
            results[t][f"{proto}_machine_us"] = statistics.median(xs)
            results[t][f"{proto}_machine_us_rounds"] = xs
        # Memory with a full cache: the same number of entries in each.
        cached = [t for t in targets if t.endswith("-cached")]
        if cached:
            log(f"== resident memory with {CACHE_ENTRIES} cached answers")
            for t, r in fill_caches(work, cached, pids, procs).items():
                results[t].update(r)
        # Allocations per query in dnslb: the hot paths are meant to make none.
        if "dnslb" in targets:
            event = malloc_probe()
            if event:
                try:
                    for proto in protos:
                        n = mallocs_per_query(pids["dnslb"](), PORTS["dnslb"], qfile, a.rate, proto == "tcp")
                        if n is not None:
                            results["dnslb"][f"{proto}_mallocs"] = n
                            log(f"  dnslb {proto.upper()}: {n:.3f} malloc calls per query at {a.rate} qps")
                finally:
                    remove_malloc_probe()
            else:
                log("  malloc count left out: no perf, or no uprobes here")
    finally:
        if detach_kernel:
            detach_kernel()
        procs.stop_all()
        if os.path.exists(os.path.join(work, "nginx.pid")):
            subprocess.run(["nginx", "-p", work, "-c", os.path.join(work, "nginx.conf"), "-s", "stop"],
                           capture_output=True)
    with open(os.path.join(work, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    log(f"raw results: {work}/results.json")
    report(results, a, targets)


def fixed_lost(r):
    """Queries lost over the CPU rounds at the fixed rate, as a share of those sent."""
    sent = r.get("fixed_sent", 0)
    return f"{100 * r.get('fixed_lost', 0) / sent:.2f} %" if sent else "—"


def report(results, a, targets):
    cpu, cores = machine()
    base = results.get("bind", {})
    lines = []
    lines.append("| target | UDP max qps | TCP max qps | UDP CPU µs/query | TCP CPU µs/query | p50 µs | p90 µs "
                 f"| p99 µs | added p50 / p90 / p99 µs | peak RSS MiB | lost in cut-overs | lost at {a.rate} qps "
                 "| SERVFAIL answers |")
    lines.append("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for t in targets:
        r = results.get(t)
        if not r:
            continue
        tcp_qps, tcp_cpu = (f"{r['tcp_qps']:.0f}", f"{r['tcp_cpu_us']:.1f}") if "tcp_qps" in r else ("—", "—")
        if t in REFERENCES:
            name, udp_cpu = ("floor (C relays)", f"{r['udp_cpu_us']:.1f}") if t == "floor" else \
                ("kernel floor (BPF: tc on UDP, sockhash on TCP)", "0 (no process)")
            lines.append(f"| {name} | {r['udp_qps']:.0f} | {tcp_qps} | {udp_cpu} | {tcp_cpu} "
                         f"| — | — | — | — | — | — | {fixed_lost(r)} | {r.get('servfail', 0)} |")
            continue
        if t == "bind":
            added_ = "—"
        else:
            added_ = " / ".join(added(r, base, k) for k in ["p50_us", "p90_us", "p99_us"])
        cut = "—" if t == "bind" else f"{r['cutover_lost']:.0f} of {r['cutover_sent']:.0f} (SERVFAIL {r['cutover_servfail']})"
        name = "echo (direct)" if t == "bind" and ECHO else t
        lines.append(f"| {name} | {r['udp_qps']:.0f} | {tcp_qps} | {r['udp_cpu_us']:.1f} | {tcp_cpu} "
                     f"| {fmt_us(r['p50_us'])} | {fmt_us(r['p90_us'])} | {fmt_us(r['p99_us'])} | {added_} | {r['rss_kib'] / 1024:.1f} | {cut} "
                     f"| {fixed_lost(r)} | {r.get('servfail', 0)} |")
    ratios = []
    def per_round(a_, b_, key):
        """The ratio within each interleaved round: a median of ratios hides how often a
        target is missed."""
        xs = [f"{p / q:.2f}" for p, q in zip(a_.get(key + "_rounds", []), b_.get(key + "_rounds", [])) if q]
        return f"; per round {', '.join(xs)}" if xs else ""

    if "dnslb-cached" in results and "dnsdist-cached" in results:
        d, x = results["dnslb-cached"], results["dnsdist-cached"]
        ratios.append(f"- cached UDP throughput dnslb/dnsdist (both with a packet cache): "
                      f"**{d['udp_qps'] / x['udp_qps']:.2f}×** (target ≥ 1.5×{per_round(d, x, 'udp_qps')})")
        ratios.append(f"- CPU per cached UDP query dnslb/dnsdist: **{d['udp_cpu_us'] / x['udp_cpu_us']:.2f}×** "
                      f"(target ≤ 0.6×{per_round(d, x, 'udp_cpu_us')})")
        if "tcp_qps" in d and "tcp_qps" in x:
            ratios.append(f"- cached TCP throughput dnslb/dnsdist: **{d['tcp_qps'] / x['tcp_qps']:.2f}×**; CPU per "
                          f"cached TCP query **{d['tcp_cpu_us'] / x['tcp_cpu_us']:.2f}×**")
        if d.get("cache_rss_kib") and x.get("cache_rss_kib"):
            ratios.append(f"- resident memory with {CACHE_ENTRIES} distinct names cached, dnslb/dnsdist: "
                          f"**{d['cache_rss_kib'] / x['cache_rss_kib']:.2f}×** (target ≤ 0.5×; "
                          f"{d['cache_rss_kib'] / 1024:.1f} MiB holding {d['cache_entries']} entries against "
                          f"{x['cache_rss_kib'] / 1024:.1f} MiB holding {x['cache_entries']}; before the fill "
                          f"{d['cache_rss_before_kib'] / 1024:.1f} and {x['cache_rss_before_kib'] / 1024:.1f} MiB)")
    if "dnslb-cached" in results and "bind" in results:
        d, b = results["dnslb-cached"], results["bind"]
        ratios.append(f"- cached UDP throughput dnslb/BIND direct: **{d['udp_qps'] / b['udp_qps']:.2f}×** "
                      f"(target ≥ 2×{per_round(d, b, 'udp_qps')})")
    if "dnslb" in results and "dnsdist" in results:
        d, x = results["dnslb"], results["dnsdist"]
        ratios.append(f"- uncached UDP throughput dnslb/dnsdist: **{d['udp_qps'] / x['udp_qps']:.2f}×** (target ≥ 1.1×"
                      f"{per_round(d, x, 'udp_qps')})")
        ratios.append(f"- uncached UDP CPU per query dnslb/dnsdist: **{d['udp_cpu_us'] / x['udp_cpu_us']:.2f}×**"
                      f"{per_round(d, x, 'udp_cpu_us').replace('; ', ' (', 1) + ')' if d.get('udp_cpu_us_rounds') else ''}")
        if "floor" in results:
            f_ = results["floor"]["udp_cpu_us"]
            ratios.append(f"- UDP CPU per query of the floor relay/dnsdist: **{f_ / x['udp_cpu_us']:.2f}×**; "
                          f"dnslb/floor: **{d['udp_cpu_us'] / f_:.2f}×**")
    if "kernel" in results and "dnsdist" in results:
        k_, x = results["kernel"], results["dnsdist"]
        ratios.append(f"- kernel floor (forwarding in the kernel, no proxy process)/dnsdist: UDP throughput "
                      f"**{k_['udp_qps'] / x['udp_qps']:.2f}×**{per_round(k_, x, 'udp_qps')}; machine CPU per query "
                      f"**{k_['udp_machine_us'] / x['udp_machine_us']:.2f}×**")
    if "tcp_qps" in results.get("kernel", {}) and "nginx" in results:
        k_, n = results["kernel"], results["nginx"]
        ratios.append(f"- kernel floor/nginx: TCP throughput **{k_['tcp_qps'] / n['tcp_qps']:.2f}×**"
                      f"{per_round(k_, n, 'tcp_qps')}; machine CPU per query "
                      f"**{k_['tcp_machine_us'] / n['tcp_machine_us']:.2f}×**")
    for proto in ["udp", "tcp"]:
        m = [(t, results[t][f"{proto}_machine_us"]) for t in targets if f"{proto}_machine_us" in results.get(t, {})]
        if m:
            ratios.append(f"- {proto.upper()} machine CPU µs per query at {a.rate} qps (every process and kernel "
                          "thread; median of the CPU rounds): " + ", ".join(f"{t} {v:.1f}" for t, v in m))
    if "dnslb" in results and "nginx" in results and "tcp_qps" in results["dnslb"]:
        d, n = results["dnslb"], results["nginx"]
        ratios.append(f"- TCP throughput dnslb/nginx: **{d['tcp_qps'] / n['tcp_qps']:.2f}×** (target ≥ 1.2×"
                      f"{per_round(d, n, 'tcp_qps')})")
        ratios.append(f"- uncached TCP CPU per query dnslb/nginx: **{d['tcp_cpu_us'] / n['tcp_cpu_us']:.2f}×** (target ≤ 1.0×"
                      f"{per_round(d, n, 'tcp_cpu_us')})")
        if "tcp_cpu_us" in results.get("floor", {}):
            f_ = results["floor"]["tcp_cpu_us"]
            ratios.append(f"- TCP CPU per query of the floor relay/nginx: **{f_ / n['tcp_cpu_us']:.2f}×**; "
                          f"dnslb/floor: **{d['tcp_cpu_us'] / f_:.2f}×**")
    lat = [(t, statistics.median(results[t]["tcp_avg_latency_rounds"])) for t in targets
           if results.get(t, {}).get("tcp_avg_latency_rounds")]
    if lat:
        ratios.append(f"- TCP average latency at {a.rate} qps (dnsperf, over the CPU rounds, median): "
                      + ", ".join(f"{t} {v:.0f} µs" for t, v in lat)
                      + " (BIND holds an answer back while an earlier one is not ACKed; a proxy that "
                      "ACKs at once gets it sooner and pays a wake-up for it)")
    inside = [t for t in targets if results.get(t, {}).get("residence_rounds")]
    if inside:
        ratios.append(f"- time inside the proxy per query at {a.rate} qps, p50 / p90 / p99 / p99.9 µs (a capture "
                      "on lo, query in to query out plus answer in to answer out; median of the rounds): "
                      + "; ".join(f"{t} " + " / ".join(fmt_us(results[t].get(f"inside_{k}"))
                                                       for k in ["p50_us", "p90_us", "p99_us", "p999_us"])
                                  for t in inside))
    if "udp_mallocs" in results.get("dnslb", {}):
        d = results["dnslb"]
        counts = ", ".join(f"{p.upper()} {d[p + '_mallocs']:.3f}" for p in ["udp", "tcp"] if p + "_mallocs" in d)
        ratios.append(f"- malloc calls per query in dnslb at {a.rate} qps: **{counts}** "
                      f"(a uprobe on libc's malloc, `perf stat -e {MALLOC_EVENT}` over 3 s)")
    if "dnslb" in results and "bind" in results:
        d = results["dnslb"]
        inside_p99 = (f"; time inside dnslb at p99: **{fmt_us(d.get('inside_p99_us'))} µs**"
                      if d.get("residence_rounds") else "")
        ratios.append(f"- added latency at {a.rate} qps, p50 / p90 / p99: **{added(d, base, 'p50_us')} / "
                      f"{added(d, base, 'p90_us')} / {added(d, base, 'p99_us')} µs** "
                      f"(target ≤ 100 µs{inside_p99}); peak RSS at {a.rss_rate} qps: **{results['dnslb']['rss_kib'] / 1024:.1f} MiB** "
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
  TCP: one per core), least-outstanding, `[tcp] max_connections_per_client` and
  `max_queries_per_connection` raised (every client here is 127.0.0.1, and dnsperf does
  not reconnect; before 2026-12-03 the per-client cap of 20 refused 12 of the TCP
  throughput run's 32 connections, which halved dnslb's TCP figure). dnsdist: one UDP listener (its
  default; measured faster here than two `reusePort` listeners), `leastOutstanding`,
  SOA health checks. nginx: 2 workers, `listen … udp reuseport`, `proxy_responses 1`,
  and a TCP server on the same port.
- dnslb-cached and dnsdist-cached: the same, each with its packet cache on and the same
  number of entries: dnslb `[cache] max_entries = {dnslb_cache_entries()}` (three quarters
  of it, {CACHE_ENTRIES}, in its UDP worker), `max_ttl_s = 86400`; dnsdist
  `newPacketCache({CACHE_ENTRIES}, {{maxTTL=86400, dontAge=true}})` on its default pool
  (TTLs not aged, as dnslb's). The query file's ten names are answered from the cache
  after their first miss. Their cut-overs flush dnslb's cache at every swap (dnsdist's
  stays: it cannot tell that the backends changed).
- resident memory with a full cache: each cached target is restarted (what the earlier
  runs made it allocate does not count), then asked {CACHE_ENTRIES} distinct names once (`n<i>.wild.example.test A`, a wildcard answer each, at 20000 qps), then its
  VmRSS is read with the entries it reports (dnslb's `dnslb_cache_entries`, dnsdist's
  `printStats()`).
- floor: `bench/floor-relay.c`, a short single-threaded C relay (poll, recvfrom,
  sendto; no parsing or checks; an ID of its own per query, so every client gets its own
  answers; queries alternate between the two backends). It is what forwarding alone costs
  a separate process on this machine, and no proxy can be much cheaper per query.
  TCP: `bench/floor-tcp-relay.c` on the same port, one thread splicing each client
  connection to a backend connection of its own (one `recv` and one `send` per read, as
  nginx's stream proxy does, with nothing else).
- kernel floor: `bench/kernel-relay.bpf.c`, a tc program on the loopback device that
  gives a query to 127.0.0.1:{PORTS['kernel']} a backend's port (at random), records it, and gives
  its answer the relay's port back, in the kernel: no process, no copy, no wake-up of a proxy. UDP
  only, no checks or health. It shows what a proxy whose packets never leave the kernel
  would cost; its CPU is in the machine CPU only (the senders' system calls do it).
  TCP: `bench/kernel-tcp-relay.c` on the same port accepts, connects a backend
  connection of its own per client and puts both sockets in a BPF sockhash whose
  verdict program (`bench/kernel-tcp-relay.bpf.c`) splices them in the kernel; the
  splicing runs in kernel worker threads, so it too shows in the machine CPU only.
- UDP / TCP max: median of {a.rounds} rounds, interleaved (each round measures every
  target once), of `{any_r['udp_cmd']}` (TCP: `{any_r['tcp_cmd']}`).
- CPU µs/query: utime+stime of the target's processes (from /proc) over a {a.seconds} s
  dnsperf run at a fixed {a.rate} qps (`-c 8`), divided by the queries answered; median
  of {a.rounds} rounds, interleaved (each round measures every target once).
- machine CPU µs/query: the same runs, counting every process and kernel thread on the
  machine (from /proc; the idle targets' health checks are in it, about 0.3 µs per
  query) and dnsperf (its rusage): what the whole machine spends per query. Work a
  proxy moves into its peers' system calls (waking them up, or the kernel floor's
  forwarding) or into kernel threads shows here.
- TCP average latency: dnsperf's own average over the TCP CPU rounds at {a.rate} qps
  (median of the rounds). dnsperf pipelines, so it includes how long BIND holds an
  answer back (Nagle) until its earlier ones are ACKed.
- p50/p90/p99: `lb/examples/latency.rs`, a probe that sends each query at its own
  scheduled time ({a.rate} qps, no bursts) and times every answer by ID; percentiles
  are over every query sent, an unanswered one counting as slower than any answer
  ("lost" where a percentile lands on one). Median of {a.rounds} interleaved rounds,
  percentile by percentile
  (`{any_r['lat_cmd']}`); "added" is the difference to BIND queried directly in the
  same run. On this shared VM the p99 of every target, BIND included, is dominated by
  scheduling stalls of several milliseconds; p50 and p90 are the stable figures.
- time inside the proxy: the probe again, each query with a name of its own
  (`q<n>.wild.example.test TXT`), under `tcpdump -i lo` of the proxy's and the
  backends' ports; `bench/residence.py` finds each query's four packets and adds
  query in → query out and answer in → answer out. Loopback captures a packet as it
  is sent, so this is the time the proxy held the query and its answer (waking,
  waiting for a CPU, its own work), without BIND's stalls that dominate the p99
  above. A query the proxy took in and never sent on counts as slower than any
  ("lost"); one BIND never answered is left out; a round in which the capture
  dropped packets is left out. Median of {min(a.rounds, 3)} interleaved rounds
  (`{results.get('dnslb', any_r).get('residence_cmd', '')}`). The capture costs CPU too, on the same two cores.
- peak RSS: VmHWM of the target's processes after a {a.rss_rate} qps run.
- malloc calls per query (dnslb only, where `perf` and uprobes are available): a uprobe on
  libc's `malloc`, counted with `perf stat -e {MALLOC_EVENT} -p <pid>` over 3 s of a steady
  {a.rate} qps load, divided by the queries sent; the probe is removed afterwards.
- lost at {a.rate} qps: dnsperf's unanswered queries over the CPU rounds (UDP and TCP
  together), as a share of those sent. CPU per query only compares when this is about 0.
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
