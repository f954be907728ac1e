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
#     dnslb_health_wait_s), and a fourth that must never be touched.
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
    if [ -s "$work/dnslb.pids" ]; then
        while read -r pid; do kill "$pid" 2>/dev/null || true; done <"$work/dnslb.pids"
    fi
    for pidfile in "$ns_root/named.pid" "$ns_renamed/named.pid" "$work/ns/t2/named.pid"; do
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

free_port() {
    python3 - <<'EOF'
import socket
while True:
    t = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    t.bind(("127.0.0.1", 0))
    port = t.getsockname()[1]
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        u.bind(("127.0.0.1", port))
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
