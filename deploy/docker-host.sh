#!/usr/bin/env bash
# Make a docker daemon answer on a Debian machine without one (this project's CI machines):
# install Debian's docker.io and debootstrap when missing, then start dockerd when none answers.
# The daemon gets no bridge, NAT or iptables rules: containers run with `--network host`.
# Prints the pid of a dockerd it started (nothing when one already answered); stop it with kill.
set -euo pipefail

log=${DOCKERD_LOG:-/var/log/onnx-classifier-dockerd.log}

if docker info >/dev/null 2>&1; then
    exit 0
fi
if [ "$(id -u)" != 0 ]; then
    echo "error: no docker daemon answers, and starting one needs root" >&2
    exit 1
fi
if ! command -v dockerd >/dev/null || ! command -v debootstrap >/dev/null; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker.io debootstrap >/dev/null
fi
setsid dockerd --bridge=none --iptables=false --ip-forward=false --ip-masq=false \
    </dev/null >"$log" 2>&1 &
pid=$!
for _ in $(seq 1 120); do
    if docker info >/dev/null 2>&1; then
        echo "$pid"
        exit 0
    fi
    if ! kill -0 "$pid" 2>/dev/null; then
        break
    fi
    sleep 0.5
done
echo "error: dockerd did not answer within 60 s; the end of its log ($log):" >&2
tail -n 20 "$log" >&2
kill "$pid" 2>/dev/null || true
exit 1
