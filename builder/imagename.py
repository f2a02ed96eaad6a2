"""The name of a customer image: the one place that forms its tags and cuts them apart.

A customer image is named ``<registry>/<customer>:<tag>``. Its immutable tag is
``<base version>[-<variant>]-<config rev>[-dirty]`` (the variant only when it is not cpu; the
config revision is the first 12 hex digits of the config commit; ``-dirty`` for a development
build from the uncommitted work tree); its moving tag is ``<base version>[-<variant>]``. The
build tags and pushes both, the release record is filed under the immutable tag
(``releases/<customer>/<tag>.yaml``), the fleet asks the registry for it and keys its state by
:class:`ImageKey`, and the audit reads it back: all through :class:`ImageName`, so the rule
changes here or nowhere.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Final

from builder.errors import ConfigError

#: The base image variants a customer image is built on; cpu is the default and unnamed in tags.
VARIANTS: Final = ("cpu", "gpu")
DEFAULT_VARIANT: Final = "cpu"
#: Hex digits of the config commit in an immutable tag.
REV_LENGTH: Final = 12
#: The suffix of a development build's tag made from the uncommitted work tree.
DIRTY: Final = "dirty"

_REV: Final = re.compile(rf"[0-9a-f]{{{REV_LENGTH}}}")


@dataclass(frozen=True, order=True)
class ImageKey:
    """One image of the fleet: a customer built on one base variant. Fleet state, plan items
    and release records are kept per image, so one variant's failure never hides behind
    another's success."""

    customer: str
    variant: str = DEFAULT_VARIANT

    def __str__(self) -> str:
        """``customer-x`` for the cpu image, ``customer-x (gpu)`` for another variant."""
        return (
            self.customer
            if self.variant == DEFAULT_VARIANT
            else f"{self.customer} ({self.variant})"
        )


def config_rev(commit: str) -> str:
    """The config revision an immutable tag names: the commit's first 12 hex digits."""
    return commit[:REV_LENGTH]


def _format_tag(version: str, variant: str, rev: str | None, dirty: bool) -> str:
    """The tag rule (see the module docstring); :func:`_parse_tag` is its inverse."""
    parts = [version]
    if variant != DEFAULT_VARIANT:
        parts.append(variant)
    if rev is not None:
        parts.append(rev)
        if dirty:
            parts.append(DIRTY)
    return "-".join(parts)


def _parse_tag(tag: str, version: str | None) -> tuple[str, str, str | None, bool] | None:
    """(base version, variant, config rev or None, dirty) of a tag made by
    :func:`_format_tag`, or None. ``version``: the base version the tag must start with
    (a record knows it); else the version is what is left of the tag."""
    if version is not None:
        if tag != version and not tag.startswith(f"{version}-"):
            return None
        parts = tag[len(version) + 1 :].split("-") if tag != version else []
    else:
        version, *parts = tag.split("-")
        # a version may hold '-' itself (2.5.0-rc1): what is not variant, rev or dirty is its
        while parts and parts[0] not in VARIANTS and not _REV.fullmatch(parts[0]):
            version = f"{version}-{parts.pop(0)}"
    if not version:
        return None
    variant = DEFAULT_VARIANT
    if parts and parts[0] in VARIANTS and parts[0] != DEFAULT_VARIANT:
        variant = parts.pop(0)
    rev = parts.pop(0) if parts and _REV.fullmatch(parts[0]) else None
    dirty = rev is not None and parts == [DIRTY]
    if dirty:
        parts.pop()
    return None if parts else (version, variant, rev, dirty)


@dataclass(frozen=True)
class ImageName:
    """A customer image's name: ``<registry>/<customer>:<tag>``, its parts typed.

    ``registry`` is where customer images go (``host[:port][/namespace]``, the setting
    ``image_registry``); ``config_rev`` None names the moving tag.
    """

    registry: str
    customer: str
    base_version: str
    variant: str = DEFAULT_VARIANT
    config_rev: str | None = None
    dirty: bool = False

    @classmethod
    def of_build(
        cls,
        registry: str,
        customer: str,
        base_version: str,
        variant: str,
        commit: str,
        *,
        dirty: bool = False,
    ) -> ImageName:
        """The immutable name of a build of config ``commit`` on ``base_version``."""
        return cls(registry, customer, base_version, variant, config_rev(commit), dirty)

    @property
    def repository(self) -> str:
        """``<registry>/<customer>``."""
        return f"{self.registry}/{self.customer}"

    @property
    def tag(self) -> str:
        """``<base version>[-<variant>][-<config rev>[-dirty]]``."""
        return _format_tag(self.base_version, self.variant, self.config_rev, self.dirty)

    @property
    def reference(self) -> str:
        """``<registry>/<customer>:<tag>``."""
        return f"{self.repository}:{self.tag}"

    def __str__(self) -> str:
        """The full reference."""
        return self.reference

    @property
    def immutable(self) -> bool:
        """Whether this names one build (a config revision), not the moving tag."""
        return self.config_rev is not None

    @property
    def moving(self) -> ImageName:
        """The moving name of the same image: ``<registry>/<customer>:<base version>[-<variant>]``."""
        return replace(self, config_rev=None, dirty=False)

    @property
    def key(self) -> ImageKey:
        """The fleet's key of this image: customer and variant."""
        return ImageKey(self.customer, self.variant)

    def in_registry(self, registry: str) -> ImageName:
        """The same image pushed to ``registry``."""
        return replace(self, registry=registry)

    @classmethod
    def parse(cls, reference: str, *, base_version: str | None = None) -> ImageName:
        """Read ``<registry>/<customer>:<tag>`` back (ConfigError if it is not such a name);
        ``base_version``, when known (a release record has it), must begin the tag."""
        name, colon, tag = reference.rpartition(":")
        registry, slash, customer = name.rpartition("/")
        readable = colon and slash and "/" not in tag and "@" not in reference
        parsed = _parse_tag(tag, base_version) if readable else None
        if parsed is None or not registry or not customer:
            expected = "<registry>/<customer>:<base version>[-<variant>][-<config rev>]"
            on = f" on base {base_version}" if base_version is not None else ""
            raise ConfigError(f"{reference!r} is not a customer image name{on} ({expected})")
        return cls(registry, customer, *parsed)


def parse_name(reference: str, *, base_version: str | None = None) -> ImageName | None:
    """:meth:`ImageName.parse`, or None where ``reference`` is not a customer image name (a
    reader of documents it did not write shows what it can)."""
    try:
        return ImageName.parse(reference, base_version=base_version)
    except ConfigError:
        return None
