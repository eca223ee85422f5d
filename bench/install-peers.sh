#!/usr/bin/env bash
# Install the benchmark's independent SMTP peers from Debian's postfix package: smtp-source (load
# generator), smtp-sink (destination) and postfix itself (the private relay instance bench/run.py
# starts on 127.0.0.1 high ports). The package is installed unconfigured ("No configuration"), so
# no system Postfix runs and nothing listens on port 25 afterwards.
#
#   sudo bench/install-peers.sh      # install what is missing (idempotent)
#   bench/install-peers.sh -n        # only check; exit 1 if something is missing
set -euo pipefail

TOOLS=(smtp-source smtp-sink postfix postconf)

usage() {
    sed -n '2,8p' "$0" | sed 's/^# \{0,1\}//'
}

have_tool() {
    command -v "$1" >/dev/null 2>&1 || [ -x "/usr/sbin/$1" ]
}

missing_tools() {
    local tool
    for tool in "${TOOLS[@]}"; do
        have_tool "$tool" || echo "$tool"
    done
}

# A system Postfix (from an earlier configured install) would hold port 25 and compete for CPU.
stop_system_postfix() {
    if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet postfix 2>/dev/null; then
        echo "stopping and disabling the system Postfix service"
        systemctl stop postfix || true
        systemctl disable postfix >/dev/null 2>&1 || true
    fi
    local pidfile=/var/spool/postfix/pid/master.pid
    if [ -r "$pidfile" ] && kill -0 "$(tr -dc 0-9 <"$pidfile")" 2>/dev/null; then
        echo "stopping the system Postfix (master pid $(tr -dc 0-9 <"$pidfile"))"
        postfix stop || true
    fi
}

warn_port_25() {
    if command -v ss >/dev/null 2>&1 && ss -ltnH 'sport = :25' 2>/dev/null | grep -q .; then
        echo "warning: something listens on port 25; bench/run.py does not need it" >&2
    fi
}

check_only=false
while getopts "nh" opt; do
    case "$opt" in
        n) check_only=true ;;
        h) usage; exit 0 ;;
        *) usage >&2; exit 2 ;;
    esac
done

missing="$(missing_tools)"
if $check_only; then
    if [ -n "$missing" ]; then
        echo "missing: $(echo $missing)"
        exit 1
    fi
    echo "ok: smtp-source, smtp-sink and postfix are installed ($(postconf -d -h mail_version 2>/dev/null || /usr/sbin/postconf -d -h mail_version))"
    exit 0
fi

if [ -n "$missing" ]; then
    if [ "$(id -u)" -ne 0 ]; then
        echo "error: installing postfix needs root: sudo $0" >&2
        exit 1
    fi
    echo "installing postfix (missing: $(echo $missing))"
    apt-get update -q
    echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends postfix
fi

if [ "$(id -u)" -eq 0 ]; then
    stop_system_postfix
fi
warn_port_25
still_missing="$(missing_tools)"
if [ -n "$still_missing" ]; then
    echo "error: still missing after install: $(echo $still_missing)" >&2
    exit 1
fi
echo "ok: smtp-source, smtp-sink and postfix are installed; no system Postfix is running"
