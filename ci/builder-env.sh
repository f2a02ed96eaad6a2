# Sourced by every builder job of this repository's pipelines (`before_script: . ci/builder-env.sh`).
# 1. Checks the CI/CD variables the job needs (IVD_REQUIRED_VARIABLES, set per job): the first
#    one missing ends the job at once with one line naming it and what it is.
# 2. Puts `builder` on PATH (installing this checkout into a venv when the image lacks it: every
#    dependency from the hash-pinned requirements-host.txt, nothing resolved from the index).
# 3. Gives it the job's registry credentials through a Docker config file.
# Prints no secret: no `set -x`, credentials are only written to a file readable by the job user.
ivd_variable_help() {
  case "$1" in
    BUILDER_BASE_REPOSITORY) echo "the inference base image repository, e.g. registry.example.com/ivd/inference-base (builder.toml's default is a loopback registry)" ;;
    BUILDER_IMAGE_REGISTRY) echo "where customer images are pushed, e.g. registry.example.com/ivd (builder.toml's default is a loopback registry)" ;;
    BUILDER_GIT_TOKEN) echo "a token with write_repository on the customer repositories, for the release records" ;;
    *) echo "see the variables listed at the top of .gitlab-ci.yml" ;;
  esac
}
for ivd_name in ${IVD_REQUIRED_VARIABLES:-}; do
  eval "ivd_value=\${$ivd_name:-}"
  if [ -z "$ivd_value" ]; then
    echo "error: CI/CD variable $ivd_name is not set: $(ivd_variable_help "$ivd_name") (Settings > CI/CD > Variables)" >&2
    return 1 2>/dev/null || exit 1
  fi
done
unset ivd_name ivd_value
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
