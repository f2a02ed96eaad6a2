"""What a message must not show: credentials in URLs and the values of secret variables.

Every text the builder prints or records from outside data (an error, a git remote, a CI URL)
goes through :func:`mask_secrets` first; it has no dependencies so the CLI and every core
module can import it.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Final

# user:password@ in a URL's authority, up to its LAST '@' (a password may hold an '@').
_CREDENTIALS_IN_URL: Final = re.compile(r"(?<=://)[^/?#\s'\"]*@")
# Query values (?private_token=..., &X-Amz-Signature=...): any of them may be a secret.
_QUERY_VALUE: Final = re.compile(r"(?<=[?&])([\w.~%-]+)=[^&#\s'\"]+")
#: Environment variables whose names say they hold a secret; their values never get printed.
_SECRET_NAME: Final = re.compile(r"TOKEN|SECRET|PASSWORD|PASSWD|CREDENTIAL|PRIVATE_KEY", re.I)
#: Git and registry tokens of CI, masked already from 4 characters (other secrets from 6).
SECRET_VARIABLES: Final = ("BUILDER_GIT_TOKEN", "CI_JOB_TOKEN", "CI_REGISTRY_PASSWORD")


def redact_url(url: str) -> str:
    """Drop user:password@ and mask query values in a URL (or any text holding URLs) before it
    is recorded or printed."""
    return _QUERY_VALUE.sub(r"\1=***", _CREDENTIALS_IN_URL.sub("", url))


def mask_secrets(text: str, env: Mapping[str, str] | None = None) -> str:
    """Text fit to print: no user:password@ or query values in URLs, and no value of a
    secret-named environment variable (git tokens, AWS and ClearML secret keys)."""
    env = os.environ if env is None else env
    text = redact_url(text)
    for name in SECRET_VARIABLES:
        value = env.get(name, "")
        if len(value) >= 4:
            text = text.replace(value, "[MASKED]")
    for name, value in env.items():
        if len(value) >= 6 and _SECRET_NAME.search(name) and value in text:
            text = text.replace(value, "[MASKED]")
    return text
