#!/usr/bin/env bash
# Fill a wheelhouse for the base image on a connected host: the hash-pinned wheels of
# requirements-<variant>.txt (for the image's platform, not this host's), the build backend,
# and the runner's own wheel built from them. The image build then needs no network.
#
#   base-image/make-wheelhouse.sh [cpu|gpu] [DEST]   (DEST default base-image/wheelhouse:
#                                                      DEST/<variant>/ wheels, DEST/runner/ runner)
#   docker build --network none -f base-image/Dockerfile \
#     --build-arg VERSION="$(cat base-image/VERSION)" --build-arg ORT_VERSION=1.31.1 \
#     --build-arg WHEELHOUSE=wheelhouse/cpu --build-arg RUNNER_WHEELHOUSE=wheelhouse/runner \
#     -t ivd/inference-base:"$(cat base-image/VERSION)" base-image
#
# `builder base build` does all of this (and labels, tags, pushes) through the docker SDK.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
variant=${1:-cpu}
root=${2:-$here/wheelhouse}
dest=$root/$variant
py=${PYTHON:-python3}
case $variant in cpu | gpu) ;; *) echo "make-wheelhouse: variant must be cpu or gpu" >&2; exit 2 ;; esac
mkdir -p "$dest"
mapfile -t plat < <("$py" "$here/lock_requirements.py" --platform-args)
"$py" -m pip download --quiet --disable-pip-version-check --no-deps --require-hashes \
  "${plat[@]}" -r "$here/requirements-$variant.txt" -r "$here/requirements-build.txt" -d "$dest"
rm -rf "$root/runner"
SOURCE_DATE_EPOCH=315532800 "$py" -m pip wheel --quiet --disable-pip-version-check --no-deps \
  --no-index --find-links "$dest" -w "$root/runner" "$here/runner"
echo "$dest"
echo "$root/runner"
