"""Git credentials and transfer bounds for every git command the builder runs.

Credentials never enter a URL that is recorded or printed: in CI a credential helper reads the
token from the environment (``BUILDER_GIT_TOKEN``, else ``CI_JOB_TOKEN``) at run time and is
scoped to the GitLab server (``BUILDER_GIT_SERVER``, else ``CI_SERVER_URL``). Git never
prompts, and gives up on a stalled transfer, so a CI job never hangs.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping
from typing import Final

#: Git never prompts, and gives up on a stalled transfer (no hung CI job).
GIT_ENV: Final = {"GIT_TERMINAL_PROMPT": "0", "GIT_ASKPASS": "true", "SSH_ASKPASS": "true"}
_STALL_CONFIG: Final = (("http.lowSpeedLimit", "1000"), ("http.lowSpeedTime", "60"))
_CREDENTIAL_HELPER: Final = (
    '!f() { test "$1" = get || exit 0; '
    'if [ -n "$BUILDER_GIT_TOKEN" ]; then '
    'echo "username=${BUILDER_GIT_USERNAME:-oauth2}"; echo "password=$BUILDER_GIT_TOKEN"; '
    'else echo "username=gitlab-ci-token"; echo "password=$CI_JOB_TOKEN"; fi; }; f'
)


def git_auth_env(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """GIT_CONFIG_* variables that bound stalled transfers and, when a token and a server are
    known, add a credential helper reading the token from the environment at run time (so it
    is never in a URL, an argument list or a config file)."""
    env = os.environ if env is None else env
    count = int(env.get("GIT_CONFIG_COUNT", "0") or 0)
    pairs = list(_STALL_CONFIG)
    server = (env.get("BUILDER_GIT_SERVER") or env.get("CI_SERVER_URL") or "").rstrip("/")
    if server and any(env.get(name) for name in ("BUILDER_GIT_TOKEN", "CI_JOB_TOKEN")):
        pairs.append((f"credential.{server}.helper", _CREDENTIAL_HELPER))
    out = {"GIT_CONFIG_COUNT": str(count + len(pairs))}
    for index, (key, value) in enumerate(pairs, start=count):
        out[f"GIT_CONFIG_KEY_{index}"] = key
        out[f"GIT_CONFIG_VALUE_{index}"] = value
    return out


@contextlib.contextmanager
def git_credentials() -> Iterator[None]:
    """Apply :func:`git_auth_env` and GIT_ENV to this process (and the git commands and
    worker processes it starts) for the duration of the block."""
    added = {**GIT_ENV, **git_auth_env()}
    saved = {key: os.environ.get(key) for key in added}
    os.environ.update(added)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
