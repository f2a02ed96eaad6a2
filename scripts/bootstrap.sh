#!/usr/bin/env bash
# Install everything this project needs on a fresh Debian bookworm machine (run as root).
# Idempotent: a second run only checks. Used by scripts/demo and scripts/test.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(git docker.io docker-registry skopeo debootstrap rabbitmq-server apache2-utils rsync)

missing=()
for pkg in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if ((${#missing[@]})); then
  echo "bootstrap: installing Debian packages: ${missing[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  # The Debian packages start their services; the project runs its own private instances.
  for svc in docker docker-registry rabbitmq-server; do
    (systemctl stop "$svc" || service "$svc" stop) >/dev/null 2>&1 || true
  done
fi

if [[ ! -x .venv/bin/python ]]; then
  python3 -m venv .venv
fi
stamp=.venv/.bootstrap-stamp
want=$(cat pyproject.toml base-image/runner/pyproject.toml 2>/dev/null | sha256sum | cut -c1-16)
if [[ ! -f $stamp || $(cat "$stamp") != "$want" ]]; then
  echo "bootstrap: installing Python packages into .venv" >&2
  .venv/bin/pip install -q -e '.[test]' -e './base-image/runner[test]'
  echo "$want" >"$stamp"
fi
