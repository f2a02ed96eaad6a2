"""Project settings: builder.toml (found upward from the working directory, else the user's
own), then BUILDER_* env.

Settings say where things are (registry backend, production store, base repository, target
registry, cache). They never hold secrets: credentials come from each service's own standard
configuration (AWS variables, clearml.conf, the Docker config).
"""

from __future__ import annotations

import os
import re
import tomllib
from dataclasses import dataclass, fields, replace
from pathlib import Path

import platformdirs

from builder.errors import ConfigError
from builder.redact import url_userinfo

SETTINGS_FILE = "builder.toml"
#: Settings that name a registry: images are named after them (in the store, in tags).
REGISTRY_SETTINGS = ("image_registry", "base_repository")
_DIGEST_SUFFIX = re.compile(r"@sha256:[0-9a-f]{64}\Z")


def refuse_credentials(value: str | None, what: str) -> str | None:
    """``value`` (a registry or repository) if it holds no ``user:password@``; else one line
    that shows only what follows the credentials. Images are named after it (the local
    store's index, tags, labels), so a password there would be kept and listed."""
    if value is None:
        return None
    name = _DIGEST_SUFFIX.sub("", value.strip())
    if "@" in name or url_userinfo(name) is not None:
        raise ConfigError(
            f"{what} holds credentials (user:password@...{name.rsplit('@', 1)[-1][:80]}); "
            "give the registry without them",
            hint="credentials come from `docker login` (DOCKER_CONFIG), or ORAS_USER and ORAS_PASS",
        )
    return value


@dataclass(frozen=True)
class Settings:
    """The builder's settings: where customers, models, weights, images and the cache are."""

    customers: Path
    model_registry: str  # "local:<folder>" or "clearml"
    production: str  # "s3://bucket[/prefix]" or "file:<folder>"
    base_repository: str
    image_registry: str
    cache_dir: Path
    root: Path = Path()  # folder of builder.toml (or the working directory): anchors relative paths
    origin: str = "defaults"  # where the settings came from, for messages
    #: The local OCI image store (base and customer images, tagged); None: <cache_dir>/oci.
    image_store: Path | None = None

    @property
    def store_dir(self) -> Path:
        """Where the local image store lives: the setting ``image_store``, else <cache_dir>/oci.

        The same folder is the build's blob store, so an assembled image is in the store
        without a copy: storing it only adds its tags to the index.
        """
        return self.image_store or self.cache_dir / "oci"

    def with_overrides(self, **values: str | Path | None) -> Settings:
        """Apply command-line overrides (None means not given)."""
        given = {k: v for k, v in values.items() if v is not None}
        return replace(self, **given)  # type: ignore[arg-type]


def user_settings_file() -> Path:
    """The user's own settings (``~/.config/ivd-builder/builder.toml`` on Linux): read when no
    project builder.toml is found, so a reviewer's commands work from any folder."""
    return platformdirs.user_config_path("ivd-builder") / SETTINGS_FILE


def _find_settings_file(start: Path) -> Path | None:
    for folder in (start, *start.parents):
        candidate = folder / SETTINGS_FILE
        if candidate.is_file():
            return candidate
    user = user_settings_file()
    return user if user.is_file() else None


def _anchor(value: str, base: Path) -> str:
    """Make a ``local:`` registry folder absolute relative to the settings file. (``file:``
    production roots stay as written: they are recorded in locks and images.)"""
    if value.startswith("local:"):
        path = Path(value.removeprefix("local:")).expanduser()
        return f"local:{path if path.is_absolute() else (base / path).resolve()}"
    return value


def load_settings(cwd: Path | None = None) -> Settings:
    """Defaults, then builder.toml (the project's, else the user's), then BUILDER_* variables."""
    cwd = cwd or Path.cwd()
    values: dict[str, str] = {
        "customers": "customers",
        "model_registry": "clearml",
        "production": "",
        "base_repository": "127.0.0.1:5000/ivd/inference-base",
        "image_registry": "127.0.0.1:5000",
        "cache_dir": str(platformdirs.user_cache_path("ivd-builder")),
        "image_store": "",
    }
    base, origin = cwd, "defaults"
    path = _find_settings_file(cwd)
    if path is not None:
        try:
            table = tomllib.loads(path.read_text("utf-8")).get("builder", {})
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"{path}: cannot read settings: {exc}") from None
        unknown = sorted(set(table) - set(values))
        if unknown:
            raise ConfigError(
                f"{path}: unknown setting {unknown[0]!r}", hint=f"known: {', '.join(values)}"
            )
        values.update({k: str(v) for k, v in table.items()})
        base, origin = path.parent, str(path)
    where = dict.fromkeys(values, origin)
    for name in values:
        env = os.environ.get(f"BUILDER_{name.upper()}")
        if env:
            values[name], where[name] = env, f"BUILDER_{name.upper()}"
    for name in REGISTRY_SETTINGS:
        refuse_credentials(values[name], f"{where[name]}: {name}")
    values = {k: _anchor(v, base) for k, v in values.items()}
    names = {f.name for f in fields(Settings)}
    kwargs = {k: v for k, v in values.items() if k in names}
    store = kwargs.pop("image_store")
    return Settings(
        image_store=(base / Path(store).expanduser()).resolve() if store else None,
        customers=(base / kwargs.pop("customers")).resolve(),
        cache_dir=Path(kwargs.pop("cache_dir")).expanduser(),
        root=base.resolve(),
        origin=origin,
        **kwargs,
    )
