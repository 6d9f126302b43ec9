#!/usr/bin/env bash
# System packages the tests need (Debian): socat for pty pairs. Idempotent;
# installs only what is missing. Run as root (CI and the dev machines are).
set -euo pipefail
need=()
command -v socat >/dev/null || need+=(socat)
command -v chromium >/dev/null || need+=(chromium)
if ((${#need[@]})); then
  if [[ $(id -u) -ne 0 ]]; then
    echo "install-deps: missing ${need[*]}; run as root or install them" >&2
    exit 1
  fi
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi
