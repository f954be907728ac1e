#!/usr/bin/env bash
# End-to-end test of the Ansible part, for real, on this machine (no VM, no systemd needed):
#
#   ansible/tests/run.sh [PATH_TO_DNSLB_BINARY]     (default: <repo>/target/debug/dnslb)
#
#  0. syntax check of playbook.yml against inventory.example.yml;
#  1. nameserver role, local instance: provisions a real named in a temp directory on a free
#     port; it must answer authoritatively (UDP and TCP); a second run must report changed=0;
#     the directory is renamed, the zone copy changed and named sent SIGHUP: the new serial
#     must be served (reload after a rename works); a run against the renamed directory must
#     reuse the running named (same pid) and restore the zone;
#  2. dnslb role into a prefix (no service): files, modes, token, `dnslb --check`,
#     `systemd-analyze verify` of the unit when available; a second run reports changed=0;
#     a missing token is refused;
#  3. the load-balancer play goes one host at a time and waits for each to be healthy: four
#     hosts, each pointed at a real dnslb started here: one fronting a real named (healthy:
#     /healthz 200, NOERROR), one fresh without backends (healthy: 503 with no backends,
#     SERVFAIL), one whose only backend is down (not healthy: the play fails on it after
#     dnslb_health_wait_s), and a fourth that must never be touched;
#  4. dnslb role in local mode (dnslb_local): a real dnslb process on 127.0.0.57 in its own
#     directory (lb1-next), fronting a real named (nameserver role, local); files, modes,
#     only relative paths in dnslb.toml; dig through it answers NOERROR; a second run reports
#     changed=0 and keeps the process; the directory is renamed (lb1-next -> lb1) while it
#     runs, then a run against lb1 with a config and token change reloads it (SIGHUP, same
#     pid): it still answers, the new token works, and an admin change writes state.json in
#     lb1; a new binary restarts it (new pid, the backend set restored from state.json); a
#     changed listen port restarts it too (dnslb applies [listen] only at start-up).
#
# Needs ansible-playbook, named, named-checkconf, named-checkzone, dig, python3. Independent of
# the caller's ansible.cfg/~/.ansible: everything goes to a temp dir that is removed on exit,
# together with every process started here. Exit status 0 only if every check passed.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ansible_dir=$(dirname "$here")
repo=$(dirname "$ansible_dir")
dnslb_src=${1:-$repo/target/debug/dnslb}
export PATH="$PATH:/usr/sbin:/sbin"

step() { printf '\n== %s\n' "$*"; }
ok() { printf 'ok: %s\n' "$*"; }
die() { printf 'FAIL: %s\n' "$*" >&2; exit 1; }

for cmd in ansible-playbook named named-checkconf named-checkzone dig python3; do
    command -v "$cmd" >/dev/null 2>&1 || die "$cmd is not installed"
done
[ -x "$dnslb_src" ] || die "dnslb binary not found or not executable: $dnslb_src"
dnslb_src=$(cd "$(dirname "$dnslb_src")" && pwd)/$(basename "$dnslb_src")

work=$(mktemp -d "${TMPDIR:-/tmp}/dnslb-ansible-test.XXXXXX")
ns_root=$work/ns/t1
ns_renamed=$work/ns/t1-renamed
prefix=$work/dnslb

cleanup() {
    local rc=$? pidfile pid
    # Local-mode load balancers of step 4 (the directory is renamed during the test).
    for pidfile in "$work/local/lb1-next/dnslb.pid" "$work/local/lb1/dnslb.pid"; do
        if [ -s "$pidfile" ]; then
            pid=$(cat "$pidfile")
            if kill "$pid" 2>/dev/null; then
                for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
                kill -9 "$pid" 2>/dev/null || true
            fi
        fi
    done
    if [ -s "$work/dnslb.pids" ]; then
        while read -r pid; do kill "$pid" 2>/dev/null || true; done <"$work/dnslb.pids"
    fi
    for pidfile in "$ns_root/named.pid" "$ns_renamed/named.pid" "$work/ns/t2/named.pid" \
        "$work/ns/t3/named.pid"; do
        if [ -s "$pidfile" ]; then
            pid=$(cat "$pidfile")
            if kill "$pid" 2>/dev/null; then
                for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
                kill -9 "$pid" 2>/dev/null || true
            fi
        fi
    done
    rm -rf "$work"
    if [ "$rc" -eq 0 ]; then printf '\nALL CHECKS PASSED\n'; else printf '\nFAILED (exit %s)\n' "$rc" >&2; fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# A private copy of the binary: a concurrent cargo build may replace the original meanwhile.
cp "$dnslb_src" "$work/dnslb-bin"
dnslb_src=$work/dnslb-bin
"$dnslb_src" --version >/dev/null || die "$dnslb_src --version failed"

# Ansible, isolated from the caller's configuration and home directory.
: >"$work/ansible.cfg"
export ANSIBLE_CONFIG=$work/ansible.cfg
export ANSIBLE_LOCAL_TEMP=$work/ansible-tmp ANSIBLE_REMOTE_TEMP=$work/ansible-tmp
export ANSIBLE_LOCALHOST_WARNING=False ANSIBLE_INVENTORY_UNPARSED_WARNING=False
export ANSIBLE_RETRY_FILES_ENABLED=False ANSIBLE_NOCOLOR=1 ANSIBLE_FORCE_COLOR=0
export ANSIBLE_STDOUT_CALLBACK=default ANSIBLE_PIPELINING=True
unset ANSIBLE_INVENTORY ANSIBLE_ROLES_PATH ANSIBLE_VAULT_PASSWORD_FILE || true

# play NAME INVENTORY HOST [ansible-playbook args...]: runs the playbook, keeps its output in
# $work/NAME.log, prints the recap; fails the test when the playbook fails.
play() {
    local name=$1 inv=$2 host=$3
    shift 3
    if ! ansible-playbook -i "$inv" "$ansible_dir/playbook.yml" --limit "$host" "$@" \
        >"$work/$name.log" 2>&1; then
        cat "$work/$name.log" >&2
        die "ansible-playbook ($name) failed"
    fi
    grep -A1 '^PLAY RECAP' "$work/$name.log" | tail -n 1
}

# expect_recap NAME HOST CHANGED: the recap of run NAME says changed=CHANGED failed=0.
expect_recap() {
    local line
    line=$(grep -E "^$2 +:" "$work/$1.log" | tail -n 1)
    [[ $line =~ changed=$3\  ]] || { cat "$work/$1.log" >&2; die "$1: expected changed=$3: $line"; }
    [[ $line =~ unreachable=0\ +failed=0 ]] || die "$1: $line"
}

# free_port [IP]: a port free for TCP and UDP on IP (default 127.0.0.1).
free_port() {
    python3 - "${1:-127.0.0.1}" <<'EOF'
import socket, sys
ip = sys.argv[1]
while True:
    t = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    t.bind((ip, 0))
    port = t.getsockname()[1]
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        u.bind((ip, port))
    except OSError:
        continue
    finally:
        u.close()
        t.close()
    print(port)
    break
EOF
}

# soa_serial PORT [dig options...]: the SOA serial of example.test from an authoritative
# answer (AA set, NOERROR), or nothing.
soa_serial() {
    local port=$1 out
    shift
    out=$(dig @127.0.0.1 -p "$port" example.test SOA +norec +time=1 +tries=2 "$@" 2>/dev/null) || return 0
    grep -q 'status: NOERROR' <<<"$out" || return 0
    grep -Eq 'flags:[^;]* aa[ ;]' <<<"$out" || return 0
    awk '$4 == "SOA" { print $7 }' <<<"$out" | head -n 1
}

# wait_serial PORT SERIAL: up to 5 s for named to serve SERIAL.
wait_serial() {
    local got=
    for _ in $(seq 50); do
        got=$(soa_serial "$1")
        [ "$got" = "$2" ] && return 0
        sleep 0.1
    done
    die "expected SOA serial $2 on port $1, got '${got:-no authoritative answer}'"
}

# ---------------------------------------------------------------------------------------------
step "0. syntax check"
(cd "$repo" && ansible-playbook --syntax-check -i ansible/inventory.example.yml ansible/playbook.yml \
    >"$work/syntax.log" 2>&1) || { cat "$work/syntax.log" >&2; die "syntax check"; }
ok "ansible-playbook --syntax-check"

# ---------------------------------------------------------------------------------------------
step "1. nameserver role, local instance"
port=$(free_port)
zone_src=$ansible_dir/zones/example.test.zone
serial=$(named-checkzone example.test "$zone_src" | awk '/serial/ { print $NF }')
[ -n "$serial" ] || die "cannot read the serial of $zone_src"
ns_inventory() {
    python3 - "$1" "$port" "$ansible_dir/zones" <<'EOF'
import json, sys
root, port, zones = sys.argv[1], int(sys.argv[2]), sys.argv[3]
print(json.dumps({
    "nameservers": {"hosts": {"t1": {
        "ansible_connection": "local",
        "ansible_python_interpreter": "/usr/bin/python3",
        "common_local": True,
        "nameserver_local": True,
        "nameserver_root": root,
        "nameserver_port": port,
        "nameserver_listen_address": "127.0.0.1",
        "nameserver_zones_dir": zones,
    }}},
    "load_balancers": {"hosts": {}},
}, indent=1))
EOF
}
ns_inventory "$ns_root" >"$work/ns.json"
echo "instance $ns_root on 127.0.0.1:$port"

play ns-1 "$work/ns.json" t1
[ -s "$ns_root/named.pid" ] || die "no named.pid in $ns_root"
pid=$(cat "$ns_root/named.pid")
kill -0 "$pid" || die "named (pid $pid) is not running"
ok "named started, pid $pid"
grep -q '^[^/]*directory "\.";' "$ns_root/named.conf" || die "named.conf: directory is not \".\""
if grep -vE '^[[:space:]]*//' "$ns_root/named.conf" | grep -nE '"/'; then
    die "named.conf contains absolute paths"
fi
ok "named.conf uses only relative paths"

wait_serial "$port" "$serial"
[ "$(soa_serial "$port" +tcp)" = "$serial" ] || die "no authoritative SOA over TCP"
ok "dig @127.0.0.1 -p $port example.test SOA +norec: aa, serial $serial (UDP and TCP)"

play ns-2 "$work/ns.json" t1
expect_recap ns-2 t1 0
[ "$(cat "$ns_root/named.pid")" = "$pid" ] || die "second run started another named"
ok "second run: changed=0, same named"

mv "$ns_root" "$ns_renamed"
new_serial=$((serial + 1))
sed -i "s/\b$serial\b/$new_serial/" "$ns_renamed/zones/example.test.zone"
kill -HUP "$pid"
wait_serial "$port" "$new_serial"
kill -0 "$pid" || die "named died on SIGHUP after the rename"
ok "renamed to $(basename "$ns_renamed"), SIGHUP: reloaded, serves serial $new_serial"

ns_inventory "$ns_renamed" >"$work/ns-renamed.json"
play ns-3 "$work/ns-renamed.json" t1
expect_recap ns-3 t1 2     # the zone copy is restored, and named reloaded
[ "$(cat "$ns_renamed/named.pid")" = "$pid" ] || die "run on the renamed dir started another named"
wait_serial "$port" "$serial"
ok "run against the renamed dir: same named (pid $pid), zone restored (serial $serial)"

kill "$pid"
for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
kill -0 "$pid" 2>/dev/null && die "named did not stop on SIGTERM"
ok "named stopped"

# ---------------------------------------------------------------------------------------------
step "2. dnslb role into a prefix (no service)"
token="test-token-$RANDOM$RANDOM"
lb_inventory() {
    python3 - "$prefix" "$dnslb_src" "$1" <<'EOF'
import json, sys
prefix, binary, token = sys.argv[1], sys.argv[2], sys.argv[3]
print(json.dumps({
    "nameservers": {"hosts": {}},
    "load_balancers": {"hosts": {"lbtest": {
        "ansible_connection": "local",
        "ansible_python_interpreter": "/usr/bin/python3",
        "common_local": True,
        "dnslb_prefix": prefix,
        "dnslb_manage_service": False,
        "dnslb_binary_src": binary,
        "dnslb_admin_token": token,
        "dnslb_listen_dns": ["127.0.0.1:5353"],
        "dnslb_backends": [
            {"name": "ns1", "address": "127.0.0.1:5301"},
            {"name": "ns2", "address": "127.0.0.1:5302", "weight": 2},
        ],
        "dnslb_acl": {"allow": ["127.0.0.0/8", "::1/128"], "deny": ["127.0.0.66/32"]},
        "dnslb_rate_limit": {"responses_per_second": 20, "burst": 40, "slip": 2,
                             "exempt": ["127.0.0.1/32"]},
    }}},
}, indent=1))
EOF
}
lb_inventory "$token" >"$work/lb.json"
play lb-1 "$work/lb.json" lbtest

bin=$prefix/usr/local/bin/dnslb
conf=$prefix/etc/dnslb/dnslb.toml
tokf=$prefix/etc/dnslb/admin.token
unit=$prefix/etc/systemd/system/dnslb.service
for f in "$bin" "$conf" "$tokf" "$unit"; do [ -f "$f" ] || die "missing $f"; done
cmp -s "$bin" "$dnslb_src" || die "$bin differs from $dnslb_src"
[ "$(stat -c %a "$bin")" = 755 ] || die "$bin mode $(stat -c %a "$bin"), want 755"
[ "$(stat -c %a "$tokf")" = 600 ] || die "$tokf mode $(stat -c %a "$tokf"), want 600"
[ "$(stat -c %U "$tokf")" = "$(id -un)" ] || die "$tokf not owned by $(id -un)"
[ "$(cat "$tokf")" = "$token" ] || die "$tokf does not hold the token"
ok "files installed: binary 0755, token 0600 owned by $(id -un)"
grep -qx 'dns = \["127.0.0.1:5353"\]' "$conf" || die "listen.dns missing in $conf"
grep -qx 'token_file = "/etc/dnslb/admin.token"' "$conf" || die "token_file missing in $conf"
grep -qx 'path = "/var/lib/dnslb/state.json"' "$conf" || die "state.path missing in $conf"
[ "$(grep -c '^\[\[backend\]\]' "$conf")" = 2 ] || die "expected 2 backends in $conf"
grep -qx 'weight = 2' "$conf" || die "weight of ns2 missing in $conf"
grep -qx '\[acl\]' "$conf" && grep -qx 'deny = \["127.0.0.66/32"\]' "$conf" || die "[acl] missing in $conf"
grep -qx '\[rate_limit\]' "$conf" && grep -qx 'responses_per_second = 20' "$conf" || die "[rate_limit] missing in $conf"
if grep -q "$token" "$conf" "$unit" "$work/lb-1.log"; then die "the token leaked into the config, unit or log"; fi
ok "config: listen, token_file, state.path, 2 backends; token only in admin.token"
"$bin" --config "$conf" --check || die "dnslb --check rejects $conf"
ok "dnslb --config $conf --check"
for want in 'Type=notify' 'ExecStart=/usr/local/bin/dnslb --config /etc/dnslb/dnslb.toml' \
    'ExecReload=/bin/kill -HUP $MAINPID' 'User=dnslb' 'AmbientCapabilities=CAP_NET_BIND_SERVICE' \
    'ProtectSystem=strict' 'StateDirectory=dnslb' 'LimitNOFILE=65536'; do
    grep -qxF "$want" "$unit" || die "unit lacks: $want"
done
ok "unit has the expected directives"
sock=$prefix/etc/systemd/system/dnslb.socket
[ -f "$sock" ] || die "no socket unit $sock"
for want in 'ListenDatagram=127.0.0.1:5353' 'ListenStream=127.0.0.1:5353' 'ReceiveBuffer=8M' 'FreeBind=yes'; do
    grep -qxF "$want" "$sock" || die "socket unit lacks: $want"
done
for want in 'Requires=dnslb.socket' 'After=dnslb.socket' 'NotifyAccess=all'; do
    grep -qxF "$want" "$unit" || die "unit lacks: $want"
done
ok "socket unit holds 127.0.0.1:5353 (UDP and TCP); the service requires it, NotifyAccess=all"
if command -v systemd-analyze >/dev/null 2>&1; then
    # The unit names the real path /usr/local/bin/dnslb; verify a copy that points at the
    # prefix so that systemd-analyze can check the executable too.
    mkdir -p "$work/verify"
    sed "s#/usr/local/bin/dnslb#$bin#" "$unit" >"$work/verify/dnslb.service"
    cp "$sock" "$work/verify/dnslb.socket"
    systemd-analyze verify "$work/verify/dnslb.socket" "$work/verify/dnslb.service" || die "systemd-analyze verify"
    ok "systemd-analyze verify"
else
    echo "skip: systemd-analyze not installed"
fi

play lb-2 "$work/lb.json" lbtest
expect_recap lb-2 lbtest 0
ok "second run: changed=0"

if ansible-playbook -i "$work/lb.json" "$ansible_dir/playbook.yml" --limit lbtest \
    -e '{"dnslb_admin_token": ""}' >"$work/lb-3.log" 2>&1; then
    die "a run without dnslb_admin_token succeeded"
fi
grep -q 'dnslb_admin_token is required' "$work/lb-3.log" || { cat "$work/lb-3.log" >&2; die "no clear message for a missing token"; }
[ "$(cat "$tokf")" = "$token" ] || die "the failed run changed the token file"
ok "a missing dnslb_admin_token is refused with a clear message"

# ---------------------------------------------------------------------------------------------
step "3. load balancer play: one host at a time, each healthy before the next"
# A nameserver for the healthy load balancer to front.
port=$(free_port)
ns_inventory "$work/ns/t2" >"$work/ns-t2.json"
play ns-4 "$work/ns-t2.json" t1
wait_serial "$port" "$serial"
ns2_port=$port

# start_dnslb NAME BACKEND_ADDR|"": a real dnslb on free ports; prints "DNS_PORT ADMIN_PORT".
start_dnslb() {
    local name=$1 backend=$2 dir=$work/lbrun/$1 dport aport
    dport=$(free_port)
    aport=$(free_port)
    mkdir -p "$dir"
    printf '%s\n' "token-$name" >"$dir/admin.token"
    chmod 600 "$dir/admin.token"
    cat >"$dir/dnslb.toml" <<EOF
[listen]
dns = ["127.0.0.1:$dport"]
admin = "127.0.0.1:$aport"
[admin]
token_file = "$dir/admin.token"
[state]
path = "$dir/state.json"
[health]
query_name = "example.test."
interval_ms = 200
timeout_ms = 200
EOF
    if [ -n "$backend" ]; then
        printf '[[backend]]\nname = "ns"\naddress = "%s"\n' "$backend" >>"$dir/dnslb.toml"
    fi
    "$dnslb_src" --config "$dir/dnslb.toml" >"$dir/log" 2>&1 &
    echo $! >>"$work/dnslb.pids"
    echo "$dport $aport"
}
read -r a_dns a_admin < <(start_dnslb lbA "127.0.0.1:$ns2_port")
read -r b_dns b_admin < <(start_dnslb lbB "")
read -r c_dns c_admin < <(start_dnslb lbC "127.0.0.1:$(free_port)")

python3 - "$work/lbs" "$dnslb_src" "$a_dns" "$a_admin" "$b_dns" "$b_admin" "$c_dns" "$c_admin" \
    >"$work/lbs.json" <<'EOF'
import json, sys
root, binary = sys.argv[1], sys.argv[2]
ports = {"lbA": sys.argv[3:5], "lbB": sys.argv[5:7], "lbC": sys.argv[7:9], "lbD": sys.argv[3:5]}
token = {"lbA": "token-lbA", "lbB": "token-lbB", "lbC": "token-lbC", "lbD": "token-lbA"}
hosts = {}
for name in ["lbA", "lbB", "lbC", "lbD"]:
    dns, admin = ports[name]
    hosts[name] = {
        "ansible_connection": "local",
        "ansible_python_interpreter": "/usr/bin/python3",
        "common_local": True,
        "dnslb_prefix": root + "/" + name,
        "dnslb_manage_service": False,
        "dnslb_wait_healthy": True,
        "dnslb_health_wait_s": 3 if name == "lbC" else 15,
        "dnslb_binary_src": binary,
        "dnslb_admin_token": token[name],
        "dnslb_listen_dns": ["127.0.0.1:" + dns],
        "dnslb_admin_listen": "127.0.0.1:" + admin,
    }
print(json.dumps({"nameservers": {"hosts": {}}, "load_balancers": {"hosts": hosts}}, indent=1))
EOF
log=$work/lbs-1.log
if ansible-playbook -i "$work/lbs.json" "$ansible_dir/playbook.yml" --limit load_balancers \
    >"$log" 2>&1; then
    cat "$log" >&2
    die "the load-balancer play succeeded although lbC never becomes healthy"
fi
grep -qF 'dnslb not healthy after 3s: /healthz is 503: none of its 1 backend(s) is up' "$log" \
    || { cat "$log" >&2; die "no clear message for the unhealthy lbC"; }
grep -Eq '^lbA +:.* failed=0' "$log" && grep -Eq '^lbB +:.* failed=0' "$log" \
    && grep -Eq '^lbC +:.* failed=1' "$log" || { cat "$log" >&2; die "unexpected recap"; }
ok "lbA (200, NOERROR) and lbB (no backends yet: 503, SERVFAIL) healthy; lbC (backend down) failed"
[ "$(grep -c '^PLAY \[Load balancers' "$log")" = 3 ] \
    || { cat "$log" >&2; die "expected three one-host batches (serial: 1)"; }
# Every line about lbA comes before the first about lbB, and lbB's before lbC's.
last_a=$(grep -n '\[lbA\]' "$log" | tail -n 1 | cut -d: -f1)
first_b=$(grep -n '\[lbB\]' "$log" | head -n 1 | cut -d: -f1)
last_b=$(grep -n '\[lbB\]' "$log" | tail -n 1 | cut -d: -f1)
first_c=$(grep -n '\[lbC\]' "$log" | head -n 1 | cut -d: -f1)
[ "$last_a" -lt "$first_b" ] && [ "$last_b" -lt "$first_c" ] \
    || { cat "$log" >&2; die "hosts were not handled one after the other"; }
if grep -q '\[lbD\]' "$log" || [ -e "$work/lbs/lbD" ]; then
    cat "$log" >&2
    die "lbD was touched after lbC failed"
fi
ok "one host at a time (three batches), each healthy before the next; the play stopped at lbC, lbD untouched"

# ---------------------------------------------------------------------------------------------
step "4. dnslb role, local mode (a dnslb process on 127.0.0.57, renamed while it runs)"
# A nameserver for it to front (the nameserver role, local, as in step 1).
port=$(free_port)
ns_inventory "$work/ns/t3" >"$work/ns-t3.json"
play ns-5 "$work/ns-t3.json" t1
wait_serial "$port" "$serial"
ns3_port=$port

lb_ip=127.0.0.57
lb_next=$work/local/lb1-next
lb_live=$work/local/lb1
lb_dns=$(free_port "$lb_ip")
lb_admin=$(free_port "$lb_ip")
ltoken="local-token-$RANDOM$RANDOM"
# local_inventory ROOT BINARY TOKEN DNS_PORT QUERY_TIMEOUT_MS: the host vars the deployer's
# local provider passes for one load balancer.
local_inventory() {
    python3 - "$@" "$lb_ip" "$lb_admin" "$ns3_port" <<'EOF'
import json, sys
root, binary, token, dns, timeout_ms, ip, admin, ns_port = sys.argv[1:9]
print(json.dumps({
    "nameservers": {"hosts": {}},
    "load_balancers": {"hosts": {"lb1": {
        "ansible_connection": "local",
        "ansible_python_interpreter": "/usr/bin/python3",
        "common_local": True,
        "dnslb_local": True,
        "dnslb_root": root,
        "dnslb_binary_src": binary,
        "dnslb_admin_token": token,
        "dnslb_listen_dns": [ip + ":" + dns],
        "dnslb_admin_listen": ip + ":" + admin,
        "dnslb_backends": [{"name": "ns1", "address": "127.0.0.1:" + ns_port}],
        "dnslb_query_timeout_ms": int(timeout_ms),
        "dnslb_health_interval_ms": 200,
        "dnslb_health_timeout_ms": 200,
        "dnslb_health_wait_s": 20,
    }}},
}, indent=1))
EOF
}

# lb_rcode PORT: the RCODE of example.test SOA through the local load balancer, or nothing.
lb_rcode() {
    dig @"$lb_ip" -p "$1" example.test SOA +time=1 +tries=2 2>/dev/null \
        | sed -n 's/.*status: \([A-Z]*\).*/\1/p' | head -n 1
}
# expect_noerror PORT WHAT: up to 5 s for a NOERROR answer through the load balancer.
expect_noerror() {
    local got=
    for _ in $(seq 25); do
        got=$(lb_rcode "$1")
        [ "$got" = NOERROR ] && { ok "$2: dig @$lb_ip -p $1 example.test SOA: NOERROR"; return 0; }
        sleep 0.2
    done
    die "$2: dig @$lb_ip -p $1 example.test SOA: expected NOERROR, got '${got:-no answer}'"
}
# admin_call METHOD PATH TOKEN [JSON]: prints "STATUS BODY" of an admin API call.
admin_call() {
    python3 - "$lb_ip:$lb_admin" "$@" <<'EOF'
import sys, urllib.error, urllib.request
addr, method, path, token = sys.argv[1:5]
body = sys.argv[5].encode() if len(sys.argv) > 5 else None
req = urllib.request.Request("http://%s%s" % (addr, path), data=body, method=method)
req.add_header("Authorization", "Bearer " + token)
if body is not None:
    req.add_header("Content-Type", "application/json")
try:
    with urllib.request.urlopen(req, timeout=5) as r:
        print(r.status, r.read().decode())
except urllib.error.HTTPError as e:
    print(e.code, e.read().decode())
EOF
}
# lb_pid DIR: the pid in DIR/dnslb.pid, which must be alive with DIR as its cwd.
lb_pid() {
    local pid
    [ -s "$1/dnslb.pid" ] || die "no $1/dnslb.pid"
    pid=$(cat "$1/dnslb.pid")
    kill -0 "$pid" 2>/dev/null || die "dnslb (pid $pid, $1/dnslb.pid) is not running"
    [ "$(readlink "/proc/$pid/cwd")" = "$1" ] || die "dnslb (pid $pid) does not run in $1"
    echo "$pid"
}

local_inventory "$lb_next" "$dnslb_src" "$ltoken" "$lb_dns" 2000 >"$work/local.json"
echo "load balancer $lb_next on $lb_ip:$lb_dns (admin $lb_ip:$lb_admin), backend 127.0.0.1:$ns3_port"
play local-1 "$work/local.json" lb1
lpid=$(lb_pid "$lb_next")
ok "dnslb started in $lb_next, pid $lpid"
cmp -s "$lb_next/dnslb" "$dnslb_src" || die "$lb_next/dnslb differs from $dnslb_src"
[ "$(stat -c %a "$lb_next/dnslb")" = 755 ] || die "$lb_next/dnslb is not 0755"
[ "$(stat -c %a "$lb_next/admin.token")" = 600 ] || die "$lb_next/admin.token is not 0600"
[ "$(cat "$lb_next/admin.token")" = "$ltoken" ] || die "admin.token does not hold the token"
[ -s "$lb_next/state.json" ] || die "no state file $lb_next/state.json"
for d in etc usr var; do [ ! -e "$lb_next/$d" ] || die "local mode created $lb_next/$d"; done
if grep -q "$ltoken" "$lb_next/dnslb.toml" "$work/local-1.log"; then die "the token leaked into dnslb.toml or the log"; fi
ok "files: dnslb 0755, dnslb.toml, admin.token 0600, state.json; no etc/usr/var tree"
grep -qx 'token_file = "admin.token"' "$lb_next/dnslb.toml" || die "token_file is not \"admin.token\""
grep -qx 'path = "state.json"' "$lb_next/dnslb.toml" || die "state.path is not \"state.json\""
if grep -v '^[[:space:]]*#' "$lb_next/dnslb.toml" | grep -n '"/'; then die "dnslb.toml contains absolute paths"; fi
ok "dnslb.toml uses only relative paths"
[ "$(readlink "/proc/$lpid/fd/0")" = /dev/null ] && [ "$(readlink "/proc/$lpid/fd/1")" = "$lb_next/dnslb.log" ] \
    && [ "$(readlink "/proc/$lpid/fd/2")" = "$lb_next/dnslb.log" ] || die "dnslb's stdio is not /dev/null + dnslb.log"
[ "$(ps -o sid= -p "$lpid" | tr -d ' ')" = "$lpid" ] || die "dnslb is not in a session of its own"
ok "stdio on /dev/null and dnslb.log, own session (setsid)"
grep -A1 'Wait until dnslb is healthy' "$work/local-1.log" | grep -q '^ok: \[lb1\]' || { cat "$work/local-1.log" >&2; die "the health wait did not pass"; }
ok "the role's health wait passed"
expect_noerror "$lb_dns" "first run"

play local-2 "$work/local.json" lb1
expect_recap local-2 lb1 0
[ "$(lb_pid "$lb_next")" = "$lpid" ] || die "second run started another dnslb"
ok "second run: changed=0, same dnslb (pid $lpid)"

mv "$lb_next" "$lb_live"
expect_noerror "$lb_dns" "renamed to lb1 while it runs"
ltoken2="local-token2-$RANDOM$RANDOM"
local_inventory "$lb_live" "$dnslb_src" "$ltoken2" "$lb_dns" 1500 >"$work/local-live.json"
play local-3 "$work/local-live.json" lb1
expect_recap local-3 lb1 3     # dnslb.toml, admin.token, and the SIGHUP handler
[ "$(lb_pid "$lb_live")" = "$lpid" ] || die "the run against the renamed dir started another dnslb"
[ ! -e "$lb_next" ] || die "the run against lb1 recreated lb1-next"
grep -q 'configuration reloaded' "$lb_live/dnslb.log" || die "no reload in $lb_live/dnslb.log"
grep -qx 'query_timeout_ms = 1500' "$lb_live/dnslb.toml" || die "the new query timeout is not in dnslb.toml"
ok "run against lb1: config and token changed, SIGHUP, same dnslb (pid $lpid)"
expect_noerror "$lb_dns" "after the reload"
read -r st _ < <(admin_call GET /v1/backends "$ltoken")
[ "$st" = 401 ] || die "the old token still works after the reload ($st)"
read -r st body < <(admin_call POST /v1/backends "$ltoken2" "{\"name\":\"ns1b\",\"address\":\"127.0.0.1:$ns3_port\"}")
[ "$st" = 201 ] || die "POST /v1/backends with the new token: $st $body"
grep -q '"ns1b"' "$lb_live/state.json" || die "the admin change is not in $lb_live/state.json"
[ ! -e "$lb_next" ] || die "dnslb wrote to the old path $lb_next"
ok "new token accepted, old one refused; the admin change was written to lb1/state.json"

# A new binary: the same program with one byte appended (the loader ignores it).
cp "$dnslb_src" "$work/dnslb-bin2"
printf '\n' >>"$work/dnslb-bin2"
local_inventory "$lb_live" "$work/dnslb-bin2" "$ltoken2" "$lb_dns" 1500 >"$work/local-bin2.json"
play local-4 "$work/local-bin2.json" lb1
expect_recap local-4 lb1 2     # the binary, and the restart handler
lpid2=$(lb_pid "$lb_live")
[ "$lpid2" != "$lpid" ] || die "a new binary did not restart dnslb"
kill -0 "$lpid" 2>/dev/null && die "the old dnslb (pid $lpid) still runs"
cmp -s "$lb_live/dnslb" "$work/dnslb-bin2" || die "the new binary was not installed"
read -r st body < <(admin_call GET /v1/backends "$ltoken2")
[ "$st" = 200 ] && [[ $body == *'"ns1b"'* ]] || die "after the restart the set lacks ns1b: $st $body"
ok "new binary: restarted (pid $lpid -> $lpid2), backend set restored from state.json"
expect_noerror "$lb_dns" "after the restart"

# A new listen port: dnslb applies [listen] only at start-up, so the reload restarts it.
lb_dns2=$(free_port "$lb_ip")
local_inventory "$lb_live" "$work/dnslb-bin2" "$ltoken2" "$lb_dns2" 1500 >"$work/local-port.json"
play local-5 "$work/local-port.json" lb1
expect_recap local-5 lb1 2     # dnslb.toml, and the reload handler (which restarted)
lpid3=$(lb_pid "$lb_live")
[ "$lpid3" != "$lpid2" ] || die "a new listen port did not restart dnslb"
ok "new listen port $lb_dns2: restarted (pid $lpid2 -> $lpid3)"
expect_noerror "$lb_dns2" "on the new port"

kill "$lpid3"
for _ in $(seq 100); do kill -0 "$lpid3" 2>/dev/null || break; sleep 0.1; done
kill -0 "$lpid3" 2>/dev/null && die "dnslb did not stop on SIGTERM"
ok "local dnslb stopped"
