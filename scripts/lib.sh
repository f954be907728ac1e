# Shared helpers for the scripts in this folder: install what is missing.
# Sourced, not run.

# as_root CMD...: run CMD as root (directly, or through sudo).
as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

# ensure_tools: install every Debian package whose command is missing.
ensure_tools() {
    local missing=() pair cmd pkg
    for pair in named:bind9 named-checkzone:bind9-utils dig:dnsutils kdig:knot-dnsutils \
                nsupdate:bind9-dnsutils dnsperf:dnsperf ansible-playbook:ansible-core curl:curl ip:iproute2; do
        cmd=${pair%%:*}; pkg=${pair#*:}
        if ! command -v "$cmd" >/dev/null 2>&1 && [ ! -x "/usr/sbin/$cmd" ]; then
            missing+=("$pkg")
        fi
    done
    if [ ${#missing[@]} -gt 0 ]; then
        echo "installing: ${missing[*]}" >&2
        as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
        as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
    fi
    # The Debian package may start a system named on port 53; ours use their own ports.
    export PATH="$PATH:/usr/sbin"
}
