"""Which base image a build uses: the registry, else the local image store, by digest after.

The lock's pin, the variant the customer asked for and the config schema versions the base's
runner accepts are checked here, once, for ``build`` and ``lock`` alike.
"""

from __future__ import annotations

from builder.contracts import VERBOSE_SCHEMA_VERSION, BaseImageRef, CustomerSpec
from builder.documents.lock import LockedBase
from builder.errors import ImageError
from builder.image.base import BaseImage, resolve_base
from builder.image.base_build import LABEL_SCHEMAS, variant_repository
from builder.image.contract import CONTRACT_LABEL
from builder.image.store import ImageStore
from builder.settings import Settings, refuse_credentials


def base_repository(
    spec: CustomerSpec, settings: Settings, override: str | None = None, variant: str = "cpu"
) -> str:
    """The base repository of a variant: `<repository>` for cpu, `<repository>-gpu` for gpu.
    One holding credentials is refused, wherever it was given."""
    if override:
        repository, what = override, "--base-repository"
    elif spec.base_repository:
        repository, what = spec.base_repository, "customer.yaml: base_image.repository"
    else:
        repository, what = settings.base_repository, "setting base_repository"
    refuse_credentials(repository, what)
    return variant_repository(repository, variant)


def check_variant(base: BaseImage, variant: str) -> None:
    """Refuse a base whose variant label is not the one the customer asked for."""
    got = base.ref.variant
    if got != variant:
        raise ImageError(
            f"base image {base.name} is the {got} variant, but this build needs {variant}",
            hint=f"point base_image.repository at the {variant} base (the gpu base lives in "
            "<repository>-gpu)",
        )


def try_resolve_base(
    spec: CustomerSpec,
    settings: Settings,
    *,
    repository: str | None = None,
    insecure: bool | None = None,
) -> tuple[BaseImage | None, str | None]:
    """The base image `lock` pins and `lock`/`validate` check against, or None and why not
    (both work without it, saying so).

    Resolved like a build does: the registry, else the local image store.
    """
    try:
        return resolve_base_image(
            base_repository(spec, settings, repository, spec.variants[0]),
            spec.base_version,
            ImageStore(settings.store_dir),
            insecure=insecure,
            keep=False,
        ), None
    except ImageError as exc:
        return None, str(exc)


def locked_base_drift(
    spec: CustomerSpec,
    settings: Settings,
    pinned: LockedBase | None,
    newest: BaseImageRef | None,
    *,
    repository: str | None = None,
    insecure: bool | None = None,
) -> tuple[list[str], list[str]]:
    """What ``lock --check`` says about the lock's base image: (drift, notes).

    The check asks whether the committed lock still describes this revision, not whether it
    is the newest possible lock: a base release is not a change of the customer's config
    (the fleet rebuild ships it, recorded, on the customer's pinned models). So a newer
    base the constraint admits is a note; drift is a pinned version whose tag now names
    another digest (the pin can no longer be rebuilt as recorded). A change of the
    constraint or the repository is a customer.yaml change, reported with the inputs.
    """
    if pinned is None or not pinned.digest:
        return [], []
    repo = base_repository(spec, settings, repository, spec.variants[0])
    notes: list[str] = []
    if newest is not None and newest.version != pinned.version:
        notes.append(
            f"base image {newest.version} is released (the lock pins {pinned.version}); the "
            "fleet rebuild ships it, or `builder lock` moves this lock to it"
        )
    try:
        now = resolve_base_image(
            repo, pinned.version, ImageStore(settings.store_dir), insecure=insecure, keep=False
        )
    except ImageError as exc:
        return [], [*notes, f"pinned base image not checked: {exc}"]
    if now.repository == pinned.repository and now.digest != pinned.digest:
        return [
            f"base image {repo}:{pinned.version} is {now.digest[:19]} now, the lock pins "
            f"{pinned.digest[:19]} (the tag was moved)"
        ], notes
    return [], notes


def check_runner_accepts(base: BaseImage) -> None:
    """Refuse a base whose runner does not accept the verbose config version we write."""
    accepted = {v.strip() for v in base.labels.get(LABEL_SCHEMAS, "").split(",") if v.strip()}
    if str(VERBOSE_SCHEMA_VERSION) not in accepted:
        shown = ", ".join(sorted(accepted)) or "none (label missing)"
        raise ImageError(
            f"base image {base.name} accepts config schema versions {shown}, not {VERBOSE_SCHEMA_VERSION}",
            hint="pick a base version whose runner reads this config version",
        )


#: What to do when no base image is found anywhere.
BASE_HINT = (
    "run `builder base build` (it builds the base into the local image store), "
    "or point base_repository at a registry that has it"
)


def _same_repository(a: str, b: str) -> bool:
    """Whether two base repositories are one, however the registry was reached: a lock made
    through ``127.0.0.1:5000`` pins what ``localhost:5000`` or a mirror serves (registry
    repositories compare by path; ``oci:`` layouts as written)."""
    if a.startswith("oci:") or b.startswith("oci:"):
        return a == b
    return a.partition("/")[2] == b.partition("/")[2]


def _check_pin(base: BaseImage, pinned: LockedBase | None) -> BaseImage:
    """Refuse a base other than the one the lock pins (version and digest)."""
    if (
        pinned
        and pinned.digest
        # the lock pins the first variant's base; another variant resolves by the constraint
        and _same_repository(pinned.repository, base.repository)
        and (pinned.version, pinned.digest) != (base.version, base.digest)
    ):
        raise ImageError(
            f"base image {base.repository} resolves to {base.version} ({base.digest[:19]}) "
            f"but the lock pins {pinned.version} ({pinned.digest[:19]})",
            hint="run `builder lock` to accept the new base, or restore the pinned one",
        )
    return base


def resolve_base_image(
    repository: str,
    version_spec: str,
    store: ImageStore,
    *,
    pinned: LockedBase | None = None,
    offline: bool = False,
    insecure: bool | None = None,
    keep: bool = True,
    notes: list[str] | None = None,
) -> BaseImage:
    """The base image of a build: from the local image store or a registry, by digest after.

    - ``pinned`` (a ``--locked`` build's lock entry: version, digest) found complete in the
      store is used as it is: no registry is contacted at all; else the registry is asked
      for that version (not the newest the constraint admits), and its digest must match.
    - ``offline``: only the store (by the pinned digest, else by ``version_spec``).
    - otherwise the registry decides (it may hold a newer version); when it cannot be reached
      or lacks the image, the store's tags are resolved instead (``notes`` says so).
    A base resolved in a registry is kept in the store (``keep``) by tag and digest, so the
    next build, ``--locked --offline`` included, needs no registry and gets the same digest.
    ``oci:DIR`` repositories are read from that layout as before.
    """
    digest = (pinned.digest if pinned else None) or ""
    # a pinned base is the pinned version, whatever was released since (its digest is
    # checked): a base release does not change what a --locked build builds on
    wanted = pinned.version if digest and pinned and pinned.version else version_spec
    if repository.startswith("oci:"):
        return _check_pin(resolve_base(repository, wanted, insecure=insecure), pinned)
    if digest:
        version = pinned.version if pinned else ""
        found = store.find_digest(repository, version, digest)
        if found is not None:
            return found
        if offline:
            raise ImageError(
                f"base image {repository}:{version} ({digest[:19]}) pinned by the lock is not "
                f"in the local image store {store.root}",
                hint="run `builder base build`, or build once online (the base is then kept)",
            )
    if offline:
        try:
            return store.find_base(repository, version_spec)
        except ImageError as exc:
            raise ImageError(f"{exc} (offline build)", hint=BASE_HINT) from None
    try:
        base = resolve_base(repository, wanted, insecure=insecure)
    except ImageError as online:
        if digest:
            raise ImageError(
                f"base image pinned by the lock ({digest[:19]}) is not in the local image store "
                f"{store.root}, and {online}",
                hint=BASE_HINT,
            ) from None
        try:
            base = store.find_base(repository, version_spec)
        except ImageError as local:
            raise ImageError(f"{online}; and {local}", hint=BASE_HINT) from None
        if notes is not None:
            notes.append(f"{online}; using the base image from the local store {store.root}")
        return base
    _check_pin(base, pinned)
    if keep:
        store.keep_base(base)
    return base


def no_contract_note(base: BaseImage) -> str:
    """The warning for a base image built before runner contracts existed."""
    return (
        f"base image {base.name} declares no runner contract (label {CONTRACT_LABEL}): "
        "plug-ins and params were not checked against its runner; rebuild the base with "
        "`builder base build --push`"
    )
