"""`builder init CUSTOMER`: a new customer's configuration, ready to validate, lock and build.

Like ``cog init``: writes customer.yaml and a short analysis.yaml into a new folder (under the
customers folder, or ``path``) and adds the customer to the fleet file. The models are picked
from the model registry by id, id prefix or name; the features are a skeleton from the runner
contract of the base image the customer will build on (the feature each model's
postprocessing feeds, with its model role, and the runner's parameter defaults as comments).
It never overwrites: an existing configuration or fleet entry is refused, and nothing is
written until every model resolved and both files passed their schemas. The new folder is
not committed: ``--worktree`` reads it (validate, lock, a development build) until it is.
"""

from __future__ import annotations

import difflib
import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import git

from builder import yamldoc
from builder.cook.load import CUSTOMER_FILE, LOCK_FILE
from builder.cook.registries import ModelRecord, ModelRegistry
from builder.cook.registries.opener import open_registry
from builder.errors import ConfigError, ImageError, RegistryError
from builder.fleet.fleetfile import FLEET_VERSION, default_fleet_path, load_fleet
from builder.fsutil import write_atomic
from builder.image.base_build import BASE_DIR, read_version, variant_repository
from builder.image.base_resolution import resolve_base_image
from builder.image.contract import (
    Contract,
    features_fed_by,
    parse_contract,
    read_base_contract,
    runner_contract_from_source,
)
from builder.image.store import ImageStore
from builder.paths import CLEARML_ID
from builder.settings import Settings

ANALYSIS_FILE: Final = "analysis.yaml"
#: The shortest id prefix accepted for a model (as `builder history` prints ids: 8 characters).
MIN_ID_PREFIX: Final = 8


@dataclass(frozen=True)
class InitRequest:
    """What `builder init` was asked for."""

    customer: str
    models: tuple[str, ...]  # registry ids, id prefixes or model names
    path: Path | None = None  # the new folder; default <customers>/<customer>
    base_version: str | None = None  # default ~=<major.minor> of base-image/VERSION
    variant: str = "cpu"
    analysis: str = "main"
    fleet: Path | None = None  # default fleet.yaml in the customers folder
    add_to_fleet: bool = True
    repo_url: str | None = None  # the fleet entry's repo, when the customer has its own
    base_repository: str | None = None


@dataclass(frozen=True)
class PickedModel:
    """A registry model as the new analysis names it, and the feature it feeds."""

    slot: str
    model_id: str
    name: str
    task_id: str
    published: bool
    feature: str
    role: str
    gives: list[str]  # its postprocessing's final prediction kinds


@dataclass
class InitResult:
    """What ``builder init`` made: the customer's folder and files, the fleet entry, next steps."""

    customer: str
    folder: str
    files: list[str]
    fleet: str | None
    fleet_repo: str | None
    base_version: str
    contract: str  # where the feature skeleton came from
    models: list[PickedModel]
    git_init: bool = False
    notes: list[str] = field(default_factory=list)
    next_steps: list[str] = field(default_factory=list)


def init_customer(request: InitRequest, settings: Settings) -> InitResult:
    """Write a new customer's files and fleet entry (see the module docstring); the result
    says what was written and the commands that validate, lock and build it."""
    name = request.customer
    pattern = yamldoc.schema("customer")["properties"]["customer"]["pattern"]
    if not re.match(pattern, name):
        raise ConfigError(
            f"customer name {name!r} is not lowercase letters, digits and '-' (at most 63, "
            "starting and ending with a letter or digit)",
            hint="it names the image repository, e.g. customer-w",
        )
    if not request.models:
        raise ConfigError(
            "no model given", hint="name each model with --model ID-OR-NAME (`builder models list`)"
        )
    folder = (request.path or settings.customers / name).expanduser().resolve()
    existing = [f for f in (CUSTOMER_FILE, ANALYSIS_FILE, LOCK_FILE) if (folder / f).exists()]
    if existing:
        raise ConfigError(
            f"{folder}: {', '.join(existing)} already there; `builder init` never overwrites",
            hint="edit the files, or choose another folder with --path",
        )
    fleet_path, fleet_text, fleet_repo = _fleet_entry(request, settings, folder)
    base_version = request.base_version or _default_constraint()
    contract, contract_note = _contract(request, settings, base_version)
    registry = open_registry(settings.model_registry)
    picked = _pick_models(registry, request.models, contract)
    customer_text = _customer_yaml(name, base_version, request.variant)
    analysis_text = _analysis_yaml(request.analysis, picked, contract)
    for text, file, schema in (
        (customer_text, CUSTOMER_FILE, "customer"),
        (analysis_text, ANALYSIS_FILE, "analysis-short"),
    ):  # our own output, checked as the build will check it
        yamldoc.validate(yamldoc.parse(text, str(folder / file)), schema)

    git_init = _ensure_repository(folder)
    write_atomic(folder / CUSTOMER_FILE, customer_text.encode())
    write_atomic(folder / ANALYSIS_FILE, analysis_text.encode())
    if fleet_path is not None and fleet_text is not None:
        write_atomic(fleet_path, fleet_text.encode())
    notes = [contract_note] if contract_note else []
    notes += [
        f"model {m.model_id} ({m.name}) is not published: a release build refuses it until it is"
        for m in picked
        if not m.published
    ]
    # a folder of the customers folder is named as the README names it: by its name
    shown = name if folder == (settings.customers / name).resolve() else _shown(folder)
    return InitResult(
        customer=name,
        folder=str(folder),
        files=[str(folder / CUSTOMER_FILE), str(folder / ANALYSIS_FILE)],
        fleet=str(fleet_path) if fleet_path else None,
        fleet_repo=fleet_repo,
        base_version=base_version,
        contract=contract.source,
        models=picked,
        git_init=git_init,
        notes=notes,
        next_steps=[
            f"builder validate {shown} --worktree",
            f"builder lock {shown} --worktree",
            f"build {shown} --worktree",
            "git add "
            + " ".join(_shown(Path(p)) for p in [folder, *([fleet_path] if fleet_path else [])])
            + f' && git commit -m "{name}: first configuration"',
            f"build {shown} --locked --push --json > build.json",
            "builder release-record --report build.json",
            f"builder verify {shown}",
        ],
    )


def _shown(path: Path) -> str:
    """A path as a user types it: relative to the working directory when below it."""
    try:
        return path.resolve().relative_to(Path.cwd().resolve()).as_posix() or "."
    except ValueError:
        return str(path)


def _default_constraint() -> str:
    """``~=X.Y`` of this checkout's base image version: every X.Y.Z from here on, until X+1."""
    major, minor = read_version().split(".")[:2]
    return f"~={major}.{minor}"


# -- the fleet file ------------------------------------------------------------------------------


def _fleet_entry(
    request: InitRequest, settings: Settings, folder: Path
) -> tuple[Path | None, str | None, str | None]:
    """(fleet file, its new text, the entry's repo), checked; (None, None, None) when the
    customer is not to be added."""
    if not request.add_to_fleet:
        return None, None, None
    path = (request.fleet or default_fleet_path(settings)).expanduser().resolve()
    if path.exists():
        fleet = load_fleet(path, settings)
        for listed in fleet.entries:
            if listed.name == request.customer:
                raise ConfigError(
                    f"{listed.where}: customer {request.customer!r} is already in the fleet file",
                    hint="choose another name, or --no-fleet",
                )
        text = path.read_text("utf-8")
    else:
        text = f"fleet_version: {FLEET_VERSION}\ncustomers:\n"
    repo = request.repo_url or _relative_repo(folder, path.parent)
    plain = re.fullmatch(r"[A-Za-z0-9._/][A-Za-z0-9._/:@+~-]*", repo) and ": " not in repo
    entry = f"- name: {request.customer}\n  repo: {repo if plain else json.dumps(repo)}\n"
    new_text = text + ("" if text.endswith("\n") else "\n") + entry
    yamldoc.validate(yamldoc.parse(new_text, str(path)), "fleet")
    return path, new_text, repo


def _relative_repo(folder: Path, base: Path) -> str:
    """The customer folder relative to the fleet file's folder (``./customer-w``)."""
    rel = Path(os.path.relpath(folder, base)).as_posix()
    return rel if rel.startswith("../") else f"./{rel}"


def _ensure_repository(folder: Path) -> bool:
    """Create the folder; `git init` it when it is in no repository (its own repository)."""
    folder.mkdir(parents=True, exist_ok=True)
    try:
        git.Repo(folder, search_parent_directories=True)
    except git.InvalidGitRepositoryError:
        git.Repo.init(folder, initial_branch="main")
        return True
    return False


# -- the runner contract -------------------------------------------------------------------------


def _contract(
    request: InitRequest, settings: Settings, base_version: str
) -> tuple[Contract, str | None]:
    """The runner contract of the base the customer will build on (registry, else the local
    image store), else the runner of this checkout (with a note saying so)."""
    repository = variant_repository(
        request.base_repository or settings.base_repository, request.variant
    )
    try:
        base = resolve_base_image(
            repository, base_version, ImageStore(settings.store_dir), keep=False
        )
        contract = read_base_contract(base, settings.cache_dir)
        if contract is not None:
            return contract, None
        why = f"base image {base.name} declares no runner contract"
    except ImageError as exc:
        why = f"no base image {repository} {base_version} was found ({exc.message})"
    runner = BASE_DIR / "runner"
    source = f"the runner in {runner}"
    return parse_contract(runner_contract_from_source(runner), source), (
        f"features from {source}: {why}; `builder validate` checks them against the base"
    )


# -- models --------------------------------------------------------------------------------------


def _pick_models(
    registry: ModelRegistry, refs: Sequence[str], contract: Contract
) -> list[PickedModel]:
    """Each reference resolved to one registry model, given a slot and the feature it feeds."""
    listed: list[ModelRecord] | None = None
    picked: list[PickedModel] = []
    for given in refs:
        ref = given.strip()
        if CLEARML_ID.fullmatch(ref):
            record = registry.get_model(ref)
        else:
            listed = listed if listed is not None else registry.list_models()
            record = registry.get_model(_match(ref, listed, registry.description).id)
        if any(p.model_id == record.id for p in picked):
            raise ConfigError(f"model {record.id} ({record.name}) is named twice")
        postprocessing = record.design.get("postprocessing") or []
        gives, fits = features_fed_by(contract, postprocessing)
        if not fits:
            kinds = ", ".join(sorted(gives or ())) or "nothing"
            known = ", ".join(sorted(contract.plugins("feature"))) or "none"
            raise ConfigError(
                f"model {record.id} ({record.name}): its postprocessing gives {kinds}, which "
                f"no feature of {contract.source} takes (features: {known})",
                hint="pick a model trained for one of these features",
            )
        feature, role = fits[0]
        base = re.sub(r"[^a-z0-9]+", "_", feature.lower()).strip("_") or "model"
        slot = f"{base}_model"
        used = {p.slot for p in picked}
        for n in range(2, len(picked) + 3):
            if slot not in used:
                break
            slot = f"{base}_model_{n}"
        picked.append(
            PickedModel(
                slot=slot,
                model_id=record.id,
                name=record.name,
                task_id=record.task,
                published=record.ready and not record.archived,
                feature=feature,
                role=role,
                gives=sorted(gives or ()),
            )
        )
    return picked


def _match(ref: str, records: Sequence[ModelRecord], where: str) -> ModelRecord:
    """The one model named ``ref``: exact name, then case-insensitive name, then id prefix."""
    for found in (
        [r for r in records if r.name == ref],
        [r for r in records if r.name.lower() == ref.lower()],
        [r for r in records if len(ref) >= MIN_ID_PREFIX and r.id.startswith(ref.lower())],
    ):
        if len(found) == 1:
            return found[0]
        if len(found) > 1:
            shown = "; ".join(f"{r.id} ({r.name})" for r in found[:5])
            raise RegistryError(
                f"{ref!r} names {len(found)} models in {where}: {shown}",
                hint="give the model id",
            )
    names = {r.name: r for r in records} | {r.id: r for r in records}
    close = difflib.get_close_matches(ref, list(names), n=1, cutoff=0.5)
    guess = f" (did you mean {names[close[0]].id} ({names[close[0]].name})?)" if close else ""
    raise RegistryError(
        f"no model {ref!r} in {where}{guess}",
        hint="`builder models list` shows every model with its id and name",
    )


# -- the files -----------------------------------------------------------------------------------


def _customer_yaml(name: str, base_version: str, variant: str) -> str:
    lines = [
        f"# {name}: written by `builder init`; edit it, then `builder validate`, `builder lock`",
        "# and commit it with analysis.yaml and customer.lock.yaml.",
        "version: 1",
        f"customer: {name}",
        "base_image:",
        f"  version: {json.dumps(base_version)}   # the base versions it accepts: rebuilt on each "
        "release they admit",
    ]
    if variant != "cpu":
        lines.append(f"  variant: {variant}")
    return "\n".join(lines) + "\n"


def _analysis_yaml(analysis: str, picked: Sequence[PickedModel], contract: Contract) -> str:
    features = contract.plugins("feature")
    lines = [
        "# Short form: models by their registry id (`builder expand` shows the verbose config the",
        f"# runner loads). The features are a skeleton from {contract.source}:",
        "# set their params (the runner's defaults are shown), and `depends_on` where a feature",
        "# should run only on tiles another marked positive.",
        "analyses:",
        f"- name: {analysis}",
        "  models:",
    ]
    for m in picked:
        lines += [
            f"    {m.slot}:",
            "      sourcing: auto",
            f"      reference: {m.model_id}   # {_comment(m.name)}, task {m.task_id[:8]}",
        ]
    lines.append("  features:")
    classes = [m.feature for m in picked]
    for index, m in enumerate(picked):
        lines.append(f"  - cls: {m.feature}")
        if classes.count(m.feature) > 1:
            lines.append(f"    name: {m.feature}_{index + 1}")
        lines.append(f"    models: {{{m.role}: {m.slot}}}")
        if index and classes[0] != m.feature:  # a dependency graph flows from the first
            lines.append(
                f"    # depends_on: [{classes[0]}]   # run only on tiles {classes[0]} marked positive"
            )
        defaults = _defaults((features.get(m.feature) or {}).get("params") or {})
        if defaults:
            lines.append(f"    # params: {defaults}   # the runner's defaults")
    return "\n".join(lines) + "\n"


def _comment(text: str) -> str:
    """One line of text, safe in a YAML comment."""
    return " ".join(text.split())[:80]


def _defaults(schema: Mapping[str, Any]) -> str:
    """``{key: default, ...}`` of a params schema, in flow style."""
    props: Mapping[str, Any] = schema.get("properties") or {}
    items = [
        f"{key}: {json.dumps(value['default'])}"
        for key, value in sorted(props.items())
        if isinstance(value, Mapping) and "default" in value
    ]
    return "{" + ", ".join(items) + "}" if items else ""
