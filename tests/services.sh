#!/usr/bin/env bash
# What the test suite needs outside Python, installed (Debian packages) or started when missing:
# promtool for the alert rules, kubectl for the Kubernetes manifests, HAProxy and nginx for the fleet
# tests (which start their own, on free ports), Chromium for the console's browser tests, Redis and
# PostgreSQL on their
# default loopback ports for the quota and ledger tests. `make test` runs it first. Without root it
# cannot install: it then stops with the one command that would.
set -euo pipefail

missing=()
command -v promtool >/dev/null 2>&1 || missing+=(prometheus)
command -v kubectl >/dev/null 2>&1 || missing+=(kubernetes-client)
command -v haproxy >/dev/null 2>&1 || [[ -x /usr/sbin/haproxy ]] || missing+=(haproxy)
command -v nginx >/dev/null 2>&1 || [[ -x /usr/sbin/nginx ]] || missing+=(nginx-light)
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
command -v redis-server >/dev/null 2>&1 || redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1 || missing+=(redis-server)
command -v pg_ctlcluster >/dev/null 2>&1 || pg_isready -h 127.0.0.1 -p 5432 >/dev/null 2>&1 || missing+=(postgresql)
if ((${#missing[@]})); then
    if [[ $(id -u) -ne 0 ]]; then
        echo "tests need: sudo apt-get install -y ${missing[*]}" >&2
        exit 1
    fi
    echo "installing ${missing[*]} (Debian packages)"
    log=$(mktemp)
    if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        "${missing[@]}"; } >"$log" 2>&1; then
        cat "$log" >&2
        exit 1
    fi
    rm -f "$log"
fi

if ! redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1; then
    redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no --dir /tmp
    for _ in $(seq 50); do redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1 && break; sleep 0.1; done
fi
if ! pg_isready -h 127.0.0.1 -p 5432 >/dev/null 2>&1; then
    if [[ $(id -u) -ne 0 ]]; then
        echo "tests need PostgreSQL on 127.0.0.1:5432: sudo pg_ctlcluster $(ls /etc/postgresql | sort -V | tail -1) main start" >&2
        exit 1
    fi
    pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | sort -V | tail -1)" main start
    for _ in $(seq 50); do pg_isready -h 127.0.0.1 -p 5432 >/dev/null 2>&1 && break; sleep 0.2; done
fi
redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null
pg_isready -h 127.0.0.1 -p 5432 >/dev/null
