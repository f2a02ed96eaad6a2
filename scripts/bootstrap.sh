#!/usr/bin/env bash
# Install everything this project needs on a fresh Debian bookworm machine (run as root).
# Idempotent: a second run only checks. Used by scripts/demo and scripts/test.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(git docker.io docker-registry skopeo debootstrap rabbitmq-server apache2-utils rsync
  libpango-1.0-0 libpangoft2-1.0-0 fonts-dejavu-core)  # pango and a font: weasyprint (audit --pdf)

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

# The host environment installs from the hash-pinned lock, never "whatever the index has today".
# A changed pyproject.toml (or base-image pin) without a refreshed lock stops here.
if ! python3 scripts/lock_env.py --check; then
  echo "bootstrap: refusing to install from a stale lock (see above)" >&2
  exit 1
fi
if [[ ! -x .venv/bin/python ]]; then
  python3 -m venv .venv
fi
stamp=.venv/.bootstrap-stamp
want=$(cat requirements-host.txt pyproject.toml base-image/runner/pyproject.toml | sha256sum | cut -c1-16)
if [[ ! -f $stamp || $(cat "$stamp") != "$want" ]]; then
  echo "bootstrap: installing Python packages into .venv from requirements-host.txt" >&2
  pip=(.venv/bin/python -m pip --disable-pip-version-check --quiet)
  "${pip[@]}" install --require-hashes --no-deps --only-binary :all: -r requirements-host.txt
  # The two projects themselves: editable, no dependency resolution (the lock has them all),
  # built with the locked setuptools (no isolated build environment fetched from the index).
  "${pip[@]}" install --no-deps --no-build-isolation --no-index -e . -e ./base-image/runner
  "${pip[@]}" check
  echo "$want" >"$stamp"
fi
