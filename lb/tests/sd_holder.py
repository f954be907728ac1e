#!/usr/bin/env python3
"""What systemd does for a socket-activated dnslb, for tests (systemd is not PID 1 here).

    sd_holder.py --udp ADDR --tcp ADDR [--rcvbuf BYTES] -- DNSLB [ARGS...]

Binds the sockets once, as a dnslb.socket unit would (ListenDatagram=, ListenStream=,
ReceiveBuffer=), and holds them for as long as it runs. Commands on stdin, one a
line; each answers one line on stdout:

    start     fork, put the sockets at fd 3.., set LISTEN_FDS, LISTEN_PID (the
              child's own pid), LISTEN_FDNAMES and NOTIFY_SOCKET, exec DNSLB; wait
              for READY=1  -> "ready PID"
    restart   like `systemctl restart`: SIGTERM the main process, wait until it
              exits, then start  -> "ready PID"
    pid       -> "pid PID" (the main process, following MAINPID= as systemd does
              with NotifyAccess=all)
    stop      SIGTERM the main process, wait, exit  -> "stopped"

Errors answer "error ..." and the holder goes on.
"""

import argparse
import os
import signal
import socket
import sys
import tempfile
import time


def parse_addr(text):
    host, port = text.rsplit(":", 1)
    return host.strip("[]"), int(port)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--udp", action="append", default=[])
    ap.add_argument("--tcp", action="append", default=[])
    ap.add_argument("--rcvbuf", type=int, default=8 << 20)
    ap.add_argument("command", nargs=argparse.REMAINDER)
    args = ap.parse_args()
    command = [c for c in args.command if c != "--"]

    socks, names = [], []
    for a in args.udp:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            s.setsockopt(socket.SOL_SOCKET, 33, args.rcvbuf)  # SO_RCVBUFFORCE
        except OSError:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, args.rcvbuf)
        s.bind(parse_addr(a))
        socks.append(s)
        names.append("dns-udp")
    for a in args.tcp:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(parse_addr(a))
        s.listen(1024)
        socks.append(s)
        names.append("dns-tcp")

    notify_dir = tempfile.mkdtemp(prefix="sd-holder-")
    notify_path = os.path.join(notify_dir, "notify")
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(notify_path)
    state = {"main": None}

    def start():
        pid = os.fork()
        if pid == 0:
            try:
                fds = [s.fileno() for s in socks]
                # Above every fd involved first, then down to 3.. (dup2 clears CLOEXEC).
                high = [os.dup(fd) for fd in fds]
                for i, fd in enumerate(high):
                    os.dup2(fd, 3 + i)
                env = dict(os.environ)
                env["LISTEN_FDS"] = str(len(fds))
                env["LISTEN_PID"] = str(os.getpid())
                env["LISTEN_FDNAMES"] = ":".join(names)
                env["NOTIFY_SOCKET"] = notify_path
                os.execve(command[0], command, env)
            finally:
                os._exit(127)
        state["main"] = pid
        deadline = time.time() + 30
        notify.settimeout(0.2)
        while time.time() < deadline:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                state["main"] = None
                return "error dnslb exited during start-up with status %d" % status
            try:
                msg = notify.recv(4096).decode()
            except socket.timeout:
                continue
            for line in msg.splitlines():
                if line.startswith("MAINPID="):
                    state["main"] = int(line.split("=", 1)[1])
                if line == "READY=1":
                    return "ready %d" % state["main"]
        return "error no READY=1 within 30 s"

    def stop():
        pid = state["main"]
        if pid is None:
            return
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        deadline = time.time() + 30
        while time.time() < deadline:
            try:
                done, _ = os.waitpid(pid, os.WNOHANG)
                if done:
                    break
            except ChildProcessError:
                # Not our child (a MAINPID that an upgrade started): poll /proc.
                if not os.path.exists("/proc/%d" % pid):
                    break
            time.sleep(0.01)
        state["main"] = None

    def drain_notify():
        """Reads MAINPID= messages sent while no command waited (SIGUSR2 upgrades),
        and reaps a main process that handed over and exited."""
        try:
            while os.waitpid(-1, os.WNOHANG)[0]:
                pass
        except ChildProcessError:
            pass
        notify.settimeout(0)
        while True:
            try:
                msg = notify.recv(4096).decode()
            except (BlockingIOError, socket.timeout):
                return
            for line in msg.splitlines():
                if line.startswith("MAINPID="):
                    state["main"] = int(line.split("=", 1)[1])

    for line in sys.stdin:
        cmd = line.strip()
        drain_notify()
        if cmd == "start":
            out = start()
        elif cmd == "restart":
            stop()
            out = start()
        elif cmd == "pid":
            out = "pid %s" % state["main"]
        elif cmd == "stop":
            stop()
            print("stopped", flush=True)
            break
        else:
            out = "error unknown command %r" % cmd
        print(out, flush=True)
    # Reap whatever is left, so a test never leaves a dnslb behind.
    stop()


if __name__ == "__main__":
    main()
