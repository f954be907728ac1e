#!/bin/sh
# Runs a local dnslb instance; used by the dnslb role in local mode (dnslb_local true).
#
#   dnslb_local.sh start|restart|reload [TIMEOUT_S]      (cwd: the instance directory)
#
# The instance directory holds dnslb, dnslb.toml (only relative paths), admin.token,
# state.json, dnslb.pid and dnslb.log. dnslb runs with that directory as its cwd, started as
# `./dnslb --config dnslb.toml`, so the directory may be renamed while it runs: every later
# open (SIGHUP re-reads dnslb.toml and admin.token; state.json is rewritten on every change)
# goes through the process' cwd, which follows the directory.
#
#   start    unless dnslb runs already (the pid in dnslb.pid is alive and, where /proc
#            tells, has this directory as its cwd): starts it in a session of its own with
#            every standard descriptor on /dev/null or dnslb.log (it holds no pipe of the
#            caller's, so Ansible does not wait for it), then waits until it is serving
#            ("admin API listening" in dnslb.log) or has exited (fails with its log).
#            Prints "started dnslb, pid N" or "dnslb already running, pid N".
#   restart  SIGTERM to the running dnslb, waits until it has exited (SIGKILL after
#            TIMEOUT_S), then start. Used for a new binary: the backend set comes back from
#            state.json and health from the file dnslb saves on SIGTERM.
#   reload   SIGHUP, then waits for dnslb's verdict in dnslb.log: "configuration reloaded"
#            (prints "reloaded") or "reload refused" (fails). When dnslb reports that a
#            changed setting ([listen], [state], [server], tcp.max_connections) only takes
#            effect after a restart, it restarts (prints "restarted ...").
# Exit status 0 on success; errors on stderr.
set -u

action=${1:-}
timeout=${2:-30}
ticks=$((timeout * 10))

die() { printf 'dnslb_local: %s\n' "$*" >&2; exit 1; }

[ -f dnslb.toml ] && [ -x dnslb ] || die "$(pwd) is not a dnslb instance directory (no dnslb or dnslb.toml)"

log_size() { if [ -f dnslb.log ]; then wc -c <dnslb.log | tr -d ' '; else echo 0; fi; }

# What dnslb logged since byte offset $1 (0 when the log was replaced meanwhile).
log_since() {
    size=$(log_size)
    from=$1
    [ "${size:-0}" -lt "$from" ] && from=0
    tail -c +"$((from + 1))" dnslb.log 2>/dev/null
}

# Prints the pid of this directory's running dnslb, or fails.
running_pid() {
    [ -s dnslb.pid ] || return 1
    pid=$(cat dnslb.pid)
    case $pid in '' | *[!0-9]*) return 1 ;; esac
    kill -0 "$pid" 2>/dev/null || return 1
    # Alive, and (where /proc tells) running in this very directory: not a recycled pid.
    if [ -e "/proc/$pid/cwd" ] && [ "$(readlink "/proc/$pid/cwd")" != "$(pwd -P)" ]; then
        return 1
    fi
    echo "$pid"
}

start() {
    if pid=$(running_pid); then
        echo "dnslb already running, pid $pid"
        return 0
    fi
    rm -f dnslb.pid
    before=$(log_size)
    # The inner shell writes its own pid, then execs dnslb (same pid), so dnslb.pid is right
    # whether or not setsid had to fork. setsid: no controlling terminal, own session.
    # shellcheck disable=SC2016
    setsid sh -c 'echo $$ >dnslb.pid.new && mv dnslb.pid.new dnslb.pid && exec ./dnslb --config dnslb.toml' \
        </dev/null >>dnslb.log 2>&1 &
    i=0
    while [ "$i" -lt "$ticks" ]; do
        if [ -s dnslb.pid ]; then
            pid=$(cat dnslb.pid)
            if ! kill -0 "$pid" 2>/dev/null; then
                log_since "$before" >&2
                die "dnslb (pid $pid) exited during start-up (see $(pwd)/dnslb.log)"
            fi
            case $(log_since "$before") in
                *"admin API listening on"*)
                    echo "started dnslb, pid $pid"
                    return 0
                    ;;
            esac
        fi
        sleep 0.1
        i=$((i + 1))
    done
    log_since "$before" >&2
    die "dnslb did not start serving within ${timeout}s (see $(pwd)/dnslb.log)"
}

stop() {
    pid=$(running_pid) || return 0
    kill -TERM "$pid" 2>/dev/null || return 0
    i=0
    while kill -0 "$pid" 2>/dev/null; do
        if [ "$i" -ge "$ticks" ]; then
            echo "dnslb_local: dnslb (pid $pid) did not stop within ${timeout}s; SIGKILL" >&2
            kill -KILL "$pid" 2>/dev/null
            sleep 0.2
            break
        fi
        sleep 0.1
        i=$((i + 1))
    done
    rm -f dnslb.pid
    echo "stopped dnslb, pid $pid"
}

reload() {
    pid=$(running_pid) || die "dnslb is not running here (dnslb.pid); nothing to reload"
    before=$(log_size)
    kill -HUP "$pid" || die "kill -HUP $pid failed"
    i=0
    while [ "$i" -lt "$ticks" ]; do
        new=$(log_since "$before")
        case $new in
            *"reload refused"*)
                printf '%s\n' "$new" >&2
                die "dnslb refused the new configuration and keeps the running one"
                ;;
            *"configuration reloaded"*)
                case $new in
                    *"takes effect only after a restart"*)
                        printf '%s\n' "$new"
                        stop && start
                        return
                        ;;
                esac
                echo "reloaded, pid $pid"
                return 0
                ;;
        esac
        kill -0 "$pid" 2>/dev/null || die "dnslb (pid $pid) exited on SIGHUP (see $(pwd)/dnslb.log)"
        sleep 0.1
        i=$((i + 1))
    done
    die "dnslb did not confirm the reload within ${timeout}s (see $(pwd)/dnslb.log)"
}

case $action in
    start) start ;;
    restart) stop && start ;;
    reload) reload ;;
    *) die "usage: dnslb_local.sh start|restart|reload [TIMEOUT_S]" ;;
esac
