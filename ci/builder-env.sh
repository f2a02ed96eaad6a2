# Sourced by every builder job of this repository's pipelines (`before_script: . ci/builder-env.sh`).
# Puts `builder` on PATH (installing this checkout into a venv when the image lacks it: every
# dependency from the hash-pinned requirements-host.txt, nothing resolved from the index) and gives
# it the job's registry credentials through a Docker config file. Prints no secret: no `set -x`,
# credentials are only written to a file readable by the job user.
if ! command -v builder >/dev/null 2>&1; then
  python3 scripts/lock_env.py --check || return 1 2>/dev/null || exit 1
  python3 -m venv "${BUILDER_VENV:-.venv}"
  "${BUILDER_VENV:-.venv}/bin/pip" install --quiet --disable-pip-version-check --require-hashes \
    --no-deps --only-binary :all: -r requirements-host.txt
  "${BUILDER_VENV:-.venv}/bin/pip" install --quiet --disable-pip-version-check --no-deps \
    --no-build-isolation --no-index . ./base-image/runner
  case "${BUILDER_VENV:-.venv}" in /*) PATH="${BUILDER_VENV}/bin:$PATH" ;; *) PATH="$PWD/${BUILDER_VENV:-.venv}/bin:$PATH" ;; esac
  export PATH
fi
if [ -n "${CI_REGISTRY_PASSWORD:-}" ] && [ -z "${DOCKER_CONFIG:-}" ]; then
  DOCKER_CONFIG="$(mktemp -d)"
  export DOCKER_CONFIG
  (umask 077 && printf '{"auths":{"%s":{"auth":"%s"}}}\n' "$CI_REGISTRY" \
    "$(printf '%s:%s' "$CI_REGISTRY_USER" "$CI_REGISTRY_PASSWORD" | base64 | tr -d '\n')" \
    > "$DOCKER_CONFIG/config.json")
fi
