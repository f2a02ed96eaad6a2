"""What a message must not show: credentials in URLs and the values of secret variables.

Every text the builder prints or records from outside data (an error, a git remote, a CI URL,
a result) goes through :func:`mask_secrets` first; it has no dependencies so the CLI and every
core module can import it. A URL given to this process (an argument, a ``BUILDER_*``
variable) has its password remembered by :func:`remember_url_secrets`, so it is masked
wherever it turns up, even where no URL pattern finds it (a password holding a space).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from typing import Final
from urllib.parse import quote, unquote

# user:password@ in a URL's authority, up to its LAST '@' (a password may hold an '@'); after
# a user name and ':' the password may hold a '/' too (a user name never does).
_CREDENTIALS_IN_URL: Final = re.compile(r"(?<=://)(?:[^/?#\s'\"@:]*:[^\s'\"]*|[^/?#\s'\"]*)@")
# user:password@ before a registry host in an image reference (no scheme): u:p@host[:port]/repo.
_CREDENTIALS_IN_REFERENCE: Final = re.compile(
    r"(?<![^\s'\"(=])[^\s'\"/@:(=]+:[^\s'\"/]+@(?=[\w.-]+(?::\d+)?/)"
)
# Query values (?private_token=..., &X-Amz-Signature=...): any of them may be a secret.
_QUERY_VALUE: Final = re.compile(r"(?<=[?&])([\w.~%-]+)=[^&#\s'\"]+")
_SCHEME: Final = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")
#: Environment variables whose names say they hold a secret; their values never get printed.
_SECRET_NAME: Final = re.compile(r"TOKEN|SECRET|PASSWORD|PASSWD|CREDENTIAL|PRIVATE_KEY", re.I)
#: Git and registry tokens of CI, masked already from 4 characters (other secrets from 6).
SECRET_VARIABLES: Final = ("BUILDER_GIT_TOKEN", "CI_JOB_TOKEN", "CI_REGISTRY_PASSWORD")
#: Shortest remembered password masked wherever it appears (shorter ones only inside URLs).
_MIN_REMEMBERED: Final = 4
_remembered: set[str] = set()


def url_userinfo(url: str) -> str | None:
    """The ``user[:password]`` of one URL (the whole text is the URL: a password may hold a
    space, '/', ':' or '@'), or None when it has none."""
    scheme = _SCHEME.match(url)
    if scheme is None:
        return None
    rest = url[scheme.end() :]
    at = rest.rfind("@")
    if at < 0:
        return None
    userinfo = rest[:at]
    user = userinfo.split(":", 1)[0]
    if any(ch in user for ch in "/?#") or (":" not in userinfo and "/" in userinfo):
        return None  # an '@' in the path, not credentials
    return userinfo


def strip_credentials(url: str) -> str:
    """One URL without its ``user:password@`` and with its query values masked: what may be
    recorded (a mirror's remote, a location) or printed."""
    userinfo = url_userinfo(url)
    if userinfo is not None:
        scheme = _SCHEME.match(url)
        assert scheme is not None
        url = url[: scheme.end()] + url[scheme.end() + len(userinfo) + 1 :]
    return redact_url(url)


def remember_url_secrets(values: Iterable[str]) -> None:
    """Remember the passwords of the URLs among ``values`` (command-line arguments, settings)
    so that :func:`mask_secrets` masks them anywhere, as written and percent-decoded."""
    for value in values:
        userinfo = url_userinfo(value.strip())
        if userinfo is None or ":" not in userinfo:
            continue
        password = userinfo.split(":", 1)[1]
        for form in (password, unquote(password), quote(password, safe="")):
            if len(form) >= _MIN_REMEMBERED:
                _remembered.add(form)


def redact_url(url: str) -> str:
    """Drop user:password@ and mask query values in a URL (or any text holding URLs) before it
    is recorded or printed."""
    text = _CREDENTIALS_IN_REFERENCE.sub("", _CREDENTIALS_IN_URL.sub("", url))
    return _QUERY_VALUE.sub(r"\1=***", text)


def mask_secrets(text: str, env: Mapping[str, str] | None = None) -> str:
    """Text fit to print: no user:password@ or query values in URLs, no remembered password
    and no value of a secret-named environment variable (git tokens, AWS and ClearML keys)."""
    env = os.environ if env is None else env
    for secret in sorted(_remembered, key=len, reverse=True):
        text = text.replace(secret, "[MASKED]")
    text = redact_url(text)
    for name in SECRET_VARIABLES:
        value = env.get(name, "")
        if len(value) >= 4:
            text = text.replace(value, "[MASKED]")
    for name, value in env.items():
        if len(value) >= 6 and _SECRET_NAME.search(name) and value in text:
            text = text.replace(value, "[MASKED]")
    return text
