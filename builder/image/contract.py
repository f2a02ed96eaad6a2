"""The runner's contract, read from the base image, and the config check made against it.

The base image ships its tile runner's contract (``tilerunner contract``: every plug-in with a
JSON Schema of its params, each feature's model roles, what postprocessing steps take and
give, the accepted verbose-config schemas) as /opt/tilerunner/contract.json, its sha256 in the
label ``com.ivd.runner.contract.sha256``. Before an image is assembled, the config is checked
against the contract of the very base it is built on, and every problem is reported at
analysis.yaml:line with the key and a did-you-mean, instead of when the first slide fails.

One definition: the params schemas are the contract file's (read from the base image, never
rebuilt here), and they are checked by the runner's own check, ``tilerunner.param_schema``
(jsonschema plus the contract's one extra keyword, ``x-not-below``, and its words,
``x-expects``). The runner package is installed beside the builder (ci/builder-env.sh,
scripts/bootstrap.sh); that module needs nothing but jsonschema. Params marked
``x-model-file`` (MODEL_FILE) name files of their model: each must be one of the model's
pinned files, inside its folder (file_reference_problems).

Contracts are cached by base manifest digest under ``<cache>/contracts/`` (sha256-checked on
every read), so ``--locked``/offline builds and ``validate`` need no layer download twice.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
import subprocess
import sys
import tarfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Final

from tilerunner.param_schema import MODEL_FILE, did_you_mean, marked, param_problems

from builder import yamldoc
from builder.contracts import CustomerSpec, ResolvedModel
from builder.cook.load import read_committed_file
from builder.errors import ImageError
from builder.fsutil import write_atomic
from builder.image.base import BaseImage
from builder.oci import BlobStore, RegistryClient, check_digest, layout_blob_path
from builder.paths import UnsafePathError, relative_parts

#: Where the base image installs the contract, and the label with its sha256.
CONTRACT_PATH: Final = "/opt/tilerunner/contract.json"
CONTRACT_LABEL: Final = "com.ivd.runner.contract.sha256"
#: Contract layouts this builder reads.
CONTRACT_VERSIONS: Final = (1,)
_MEMBER = CONTRACT_PATH.lstrip("/")
_MAX_CONTRACT = 4 << 20
_RUNNER_TIMEOUT = 120


@dataclass(frozen=True)
class Contract:
    """A runner contract and where it came from."""

    data: Mapping[str, Any]
    sha256: str
    source: str  # e.g. "base image 127.0.0.1:5000/ivd/inference-base:2.4.1"

    def plugins(self, kind: str) -> Mapping[str, Any]:
        """The contract's plug-ins of one kind (``preprocessing`` ...), by name; empty if none."""
        found: Mapping[str, Any] = (self.data.get("plugins") or {}).get(kind) or {}
        return found


def parse_contract(raw: bytes, source: str) -> Contract:
    """A contract from its bytes; ImageError when it is not one this builder reads."""
    try:
        data = json.loads(raw)
    except ValueError:
        raise ImageError(f"{source}: the runner contract is not JSON") from None
    if not isinstance(data, dict) or data.get("contract_version") not in CONTRACT_VERSIONS:
        version = data.get("contract_version") if isinstance(data, dict) else None
        raise ImageError(
            f"{source}: runner contract version {version!r} is not one this builder reads "
            f"({', '.join(map(str, CONTRACT_VERSIONS))})",
            hint="upgrade ivd-image-builder",
        )
    return Contract(data=data, sha256=hashlib.sha256(raw).hexdigest(), source=source)


def runner_contract_from_source(runner_dir: Path) -> bytes:
    """`tilerunner contract` of the runner package in ``runner_dir`` (for `builder base build`).

    Run in a subprocess with that folder first on the import path: the contract is derived
    from the runner's own plug-in classes, never copied.
    """
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(runner_dir), *_pythonpath()])}
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "tilerunner", "contract"],
            capture_output=True,
            env=env,
            timeout=_RUNNER_TIMEOUT,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise ImageError(f"`tilerunner contract` did not finish in {_RUNNER_TIMEOUT} s") from None
    if proc.returncode != 0:
        tail = " ".join(proc.stderr.decode(errors="replace").strip().splitlines()[-2:])
        raise ImageError(
            f"cannot compute the runner contract from {runner_dir}: {tail}",
            hint="install the runner's requirements on this host (pip install -e base-image/runner)",
        )
    return proc.stdout


def _pythonpath() -> list[str]:
    return [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]


def _cache_path(cache_dir: Path, base: BaseImage) -> Path:
    return cache_dir / "contracts" / f"{check_digest(base.digest).split(':', 1)[1]}.json"


def _layer_file(base: BaseImage, digest: str, size: int, cache_dir: Path) -> Path:
    """A base layer blob on disk (the layout's own file, or downloaded into the blob store)."""
    if base.layout is not None:
        return layout_blob_path(base.layout, digest)

    store = BlobStore(cache_dir / "oci")
    found = store.existing(digest)
    if found is not None:
        return found
    assert base.registry is not None
    client = RegistryClient(base.registry, insecure=base.insecure)
    return client.download_blob(base.path, digest, store, size=size)


def _find_in_layer(path: Path) -> bytes | None:
    """The contract file in a layer tar (gzip or not), or None."""
    try:
        with tarfile.open(path, "r:*") as tar:
            for member in tar:
                name = PurePosixPath(member.name.removeprefix("./")).as_posix()
                if name == _MEMBER and member.isfile() and member.size <= _MAX_CONTRACT:
                    file = tar.extractfile(member)
                    return file.read() if file is not None else None
    except (tarfile.TarError, OSError, EOFError):
        return None
    return None


def read_base_contract(base: BaseImage, cache_dir: Path) -> Contract | None:
    """The contract the base image declares, or None when it declares none (older bases).

    The label gives the sha256; the file is taken from the cache, else from the topmost
    layer that holds it (the base image's last layer is the contract alone).
    """
    expected = base.labels.get(CONTRACT_LABEL, "").strip()
    if not expected:
        return None
    source = f"base image {base.name}"
    cached = _cache_path(cache_dir, base)
    if cached.is_file():
        raw = cached.read_bytes()
        if hashlib.sha256(raw).hexdigest() == expected:
            return parse_contract(raw, source)
    for layer in reversed(base.layers):
        raw_or_none = _find_in_layer(_layer_file(base, layer.digest, layer.size, cache_dir))
        if raw_or_none is None:
            continue
        if hashlib.sha256(raw_or_none).hexdigest() != expected:
            raise ImageError(
                f"{source}: {CONTRACT_PATH} does not match its label {CONTRACT_LABEL}",
                hint="the base image was altered after it was built; rebuild it with "
                "`builder base build --push`",
            )
        contract = parse_contract(raw_or_none, source)
        write_atomic(cached, raw_or_none)
        return contract
    raise ImageError(
        f"{source} has the label {CONTRACT_LABEL} but no {CONTRACT_PATH}",
        hint="rebuild it with `builder base build --push`",
    )


# == the check ================================================================================


Problem = tuple[tuple[str | int, ...], str]


def params_problems(schema: Mapping[str, Any], params: Any, what: str) -> list[Problem]:
    """Problems of one params mapping (one per top-level key at most), checked with the
    schema read from the contract file by the runner's own check (tilerunner.param_schema)."""
    out: list[Problem] = []
    seen: set[tuple[str | int, ...]] = set()
    for sub, message in param_problems(schema, params if params is not None else {}):
        if sub[:1] in seen and len(sub) > 1:
            continue
        seen.add(sub[:1])
        out.append((sub, f"{what}: {message}"))
    return out


def chain_problems(
    contract: Contract, kind: str, chain: Sequence[Mapping[str, Any]]
) -> tuple[list[Mapping[str, Any]] | None, list[Problem]]:
    """Check each step's class and params: (contract entries or None if a class is unknown,
    problems with paths relative to the chain)."""
    known = contract.plugins(kind)
    entries: list[Mapping[str, Any]] | None = []
    problems: list[Problem] = []
    for index, step in enumerate(chain):
        cls = str(step.get("cls"))
        entry = known.get(cls)
        if entry is None:
            problems.append(
                (
                    (index, "cls"),
                    f"unknown {kind} plug-in {cls!r} ({did_you_mean(cls, sorted(known))}"
                    f"known: {', '.join(sorted(known))})",
                )
            )
            entries = None
            continue
        for sub, message in params_problems(entry.get("params") or {}, step.get("params"), cls):
            problems.append(((index, "params", *sub), message))
        if entries is not None:
            entries.append(entry)
    return entries, problems


@dataclass
class _Checker:
    contract: Contract
    doc: yamldoc.Document  # the short analysis with its line numbers
    problems: list[str]

    def report(self, path: tuple[str | int, ...], message: str) -> None:
        self.problems.append(f"{self.doc.where(path)}: {yamldoc.dotted(path)}: {message}")

    def report_all(self, path: tuple[str | int, ...], problems: Sequence[Problem]) -> None:
        for sub, message in problems:
            self.report((*path, *sub), message)


def _final_kinds(entries: Sequence[Mapping[str, Any]], start: set[str]) -> set[str] | None:
    """Prediction kinds a postprocessing chain can end in (None: the contract does not say)."""
    kinds = set(start)
    for entry in entries:
        table = entry.get("kinds")
        if not table:
            return None
        kinds = {table[k] for k in kinds if k in table}
    return kinds


def features_fed_by(
    contract: Contract, postprocessing: Sequence[Mapping[str, Any]]
) -> tuple[set[str] | None, list[tuple[str, str]]]:
    """What a model with this postprocessing chain gives (its final prediction kinds; None
    when the contract cannot tell), and every (feature class, model role) that takes it, by
    feature name: what `builder init` builds a feature skeleton from."""
    steps = contract.plugins("postprocessing")
    entries = [steps.get(str(step.get("cls")), {}) for step in postprocessing]
    final = _final_kinds(entries, _model_output_kinds(contract))
    fits = [
        (cls, role)
        for cls, entry in sorted(contract.plugins("feature").items())
        for role, kind in sorted((entry.get("models") or {}).items())
        if final is None or kind in final
    ]
    return final, fits


def check_config(
    spec: CustomerSpec,
    contract: Contract,
    models: Sequence[ResolvedModel] | None,
    verbose: Mapping[str, Any] | None = None,
) -> list[str]:
    """Every way the config breaks the runner contract, each at analysis.yaml:line with the key.

    ``models`` None checks what the customer wrote (features, analysis params, manual models)
    but not the registry's plug-ins; ``verbose`` is also checked against the contract's config
    schema when given.
    """
    origin = f"{spec.source.location}/{spec.analysis_path}"
    raw = read_committed_file(spec, spec.analysis_path) or b""
    doc = yamldoc.parse(raw, origin)
    checker = _Checker(contract, doc, [])
    data = contract.data
    version = (verbose or {}).get("schema_version")
    accepted = [int(v) for v in data.get("config_schema_versions") or []]
    if verbose is not None and version not in accepted:
        checker.problems.append(
            f"{origin}: the config is schema_version {version}; the runner of "
            f"{contract.source} accepts {', '.join(map(str, accepted)) or 'none'}"
        )
    by_name = {m.name: m for m in models or ()}
    seen: dict[str, int] = {}
    for a_index, analysis in enumerate(spec.analysis.get("analyses") or []):
        a_path: tuple[str | int, ...] = ("analyses", a_index)
        a_name = str(analysis.get("name"))
        if a_name in seen:
            checker.report(
                (*a_path, "name"),
                f"analysis name {a_name!r} is used twice (also analyses[{seen[a_name]}])",
            )
        seen.setdefault(a_name, a_index)
        checker.report_all(
            (*a_path, "params"),
            params_problems(data.get("analysis_params") or {}, analysis.get("params"), "params"),
        )
        chains = _check_models(checker, a_path, analysis, by_name)
        _check_features(checker, a_path, analysis, chains)
    if verbose is not None and not checker.problems:
        schema = (data.get("config_schemas") or {}).get(str(version))
        if schema:
            for path, message in param_problems(schema, verbose):
                checker.report(path, f"the runner's config schema: {message}")
    return checker.problems


def _check_models(
    checker: _Checker,
    a_path: tuple[str | int, ...],
    analysis: Mapping[str, Any],
    by_name: Mapping[str, ResolvedModel],
) -> dict[str, list[Mapping[str, Any]] | None]:
    """Plug-ins of each model (written in the file, or from the registry); their postprocessing
    contract entries by model name, for the feature checks."""
    contract = checker.contract
    short_models: Mapping[str, Any] = analysis.get("models") or {}
    chains: dict[str, list[Mapping[str, Any]] | None] = {}
    for name, short in sorted(short_models.items()):
        m_path = (*a_path, "models", name)
        model = by_name.get(name)
        manual = isinstance(short, Mapping) and short.get("sourcing") == "manual"
        if manual:
            checker.report_all(
                (*m_path, "params"), _model_params_problems(contract, short.get("params"))
            )
        for kind in ("preprocessing", "postprocessing"):
            if manual:
                entries, found = chain_problems(contract, kind, list(short.get(kind) or []))
                checker.report_all((*m_path, kind), found)
            elif model is not None:
                chain = [p.to_dict() for p in getattr(model, kind)]
                entries, found = chain_problems(contract, kind, chain)
                for sub, message in found:
                    checker.report(
                        (*m_path, "reference"),
                        f"model {name} ({model.model_id}, from the registry): "
                        f"{yamldoc.dotted((kind, *sub))}: {message}",
                    )
            else:
                continue
            if kind == "postprocessing":
                chains[name] = entries
                dead = _dead_step(entries or [], _model_output_kinds(contract))
                if dead is not None:
                    index, takes, gets = dead
                    where = (*m_path, "postprocessing", index) if manual else (*m_path, "reference")
                    checker.report(
                        where,
                        f"model {name}: postprocessing[{index}] takes {takes} but gets {gets} "
                        "(see `kinds` in `tilerunner contract`)",
                    )
    return chains


def _dead_step(
    entries: Sequence[Mapping[str, Any]], start: set[str]
) -> tuple[int, str, str] | None:
    """The first step of a chain that takes none of the kinds it can get: (index, takes, gets)."""
    kinds = set(start)
    for index, entry in enumerate(entries):
        table: Mapping[str, str] = entry.get("kinds") or {}
        if not table:
            return None
        after = {table[k] for k in kinds if k in table}
        if kinds and not after:
            return index, " or ".join(sorted(table)), " or ".join(sorted(kinds))
        kinds = after
    return None


def _model_output_kinds(contract: Contract) -> set[str]:
    """Prediction kinds a raw model output can be (scores or maps, by its rank)."""
    kinds = (contract.data.get("prediction_kinds") or {}).get("model_output") or {}
    return {str(k) for k in kinds.values()}


def _model_params_problems(contract: Contract, params: Any) -> list[Problem]:
    """A manual model's params against the model params of the runner's newest config schema."""
    schemas: Mapping[str, Any] = contract.data.get("config_schemas") or {}
    if not schemas:
        return []
    newest = schemas[max(schemas, key=int)]
    schema = {"$defs": newest.get("$defs") or {}, "$ref": "#/$defs/model_params"}
    if "model_params" not in schema["$defs"]:
        return []
    return list(param_problems(schema, params if params is not None else {}))


def _check_features(
    checker: _Checker,
    a_path: tuple[str | int, ...],
    analysis: Mapping[str, Any],
    chains: Mapping[str, list[Mapping[str, Any]] | None],
) -> None:
    """Each feature's class, roles, params, name and depends_on; and dependency cycles."""
    features_kind = checker.contract.plugins("feature")
    features = list(analysis.get("features") or [])
    names = [str(f.get("name") or f.get("cls")) for f in features]
    # A feature named by a mistyped class: `depends_on` naming the class it was meant to be is
    # the same mistake, reported once (on `cls`), not again with the typo as the suggestion.
    meant = {
        match[0]
        for f in features
        if not f.get("name") and str(f.get("cls")) not in features_kind
        for match in [difflib.get_close_matches(str(f.get("cls")), list(features_kind), n=1)]
        if match
    }
    folded: dict[str, int] = {}
    for f_index, feature in enumerate(features):
        f_path = (*a_path, "features", f_index)
        cls = str(feature.get("cls"))
        entry = features_kind.get(cls)
        if entry is None:
            checker.report(
                (*f_path, "cls"),
                f"unknown feature plug-in {cls!r} ({did_you_mean(cls, sorted(features_kind))}"
                f"known: {', '.join(sorted(features_kind))})",
            )
        else:
            _check_feature(checker, entry, feature, f_path, chains, cls)
        key = names[f_index].lower()
        if key in folded:
            checker.report(
                (*f_path, "name" if feature.get("name") else "cls"),
                f"feature name {names[f_index]!r} is used twice (case-insensitively, "
                f"also features[{folded[key]}]); give one of them a `name`",
            )
        folded.setdefault(key, f_index)
        for d_index, parent in enumerate(feature.get("depends_on") or []):
            d_path = (*f_path, "depends_on", d_index)
            if parent == names[f_index]:
                checker.report(d_path, f"feature {parent!r} depends on itself")
            elif parent not in names and parent not in meant:
                checker.report(
                    d_path,
                    f"no feature {parent!r} in analysis {analysis.get('name')!r} "
                    f"({did_you_mean(str(parent), names)}features: {', '.join(names)})",
                )
    cycle = _cycle(names, features)
    if cycle:
        checker.report((*a_path, "features"), f"features depend on each other in a cycle: {cycle}")


def _check_feature(
    checker: _Checker,
    entry: Mapping[str, Any],
    feature: Mapping[str, Any],
    f_path: tuple[str | int, ...],
    chains: Mapping[str, list[Mapping[str, Any]] | None],
    cls: str,
) -> None:
    roles: Mapping[str, str] = entry.get("models") or {}
    given: Mapping[str, Any] = feature.get("models") or {}
    for role in sorted(set(given) - set(roles)):
        checker.report(
            (*f_path, "models", role),
            f"{cls} has no model role {role!r} ({did_you_mean(role, sorted(roles))}"
            f"roles: {', '.join(sorted(roles))})",
        )
    for role in sorted(set(roles) - set(given)):
        checker.report((*f_path, "models"), f"{cls} needs a model for role {role!r}")
    checker.report_all(
        (*f_path, "params"), params_problems(entry.get("params") or {}, feature.get("params"), cls)
    )
    start = _model_output_kinds(checker.contract)
    for role, model_name in sorted(given.items()):
        needed = roles.get(role)
        entries = chains.get(str(model_name))
        if needed is None or entries is None or not start:
            continue
        final = _final_kinds(entries, start)
        if final is not None and needed not in final:
            gives = " or ".join(sorted(final)) or "nothing it accepts"
            checker.report(
                (*f_path, "models", role),
                f"{cls} needs {needed} from {role} but model {model_name}'s postprocessing "
                f"gives {gives}",
            )


def _cycle(names: Sequence[str], features: Sequence[Mapping[str, Any]]) -> str | None:
    """A dependency cycle among the features as "A -> B -> A", or None."""
    parents = {
        names[i]: [str(p) for p in (f.get("depends_on") or []) if p in names and p != names[i]]
        for i, f in enumerate(features)
    }
    state: dict[str, int] = {}

    def visit(name: str, chain: list[str]) -> str | None:
        if state.get(name) == 2:
            return None
        if state.get(name) == 1:
            return " -> ".join([*chain[chain.index(name) :], name])
        state[name] = 1
        for parent in parents.get(name, []):
            found = visit(parent, [*chain, name])
            if found:
                return found
        state[name] = 2
        return None

    for name in names:
        found = visit(name, [])
        if found:
            return found
    return None


# == model files ==============================================================================


def _model_params_schema(contract: Contract | None) -> Mapping[str, Any]:
    """The model params schema of the runner's newest config schema, or (no contract) of
    this builder's own copy of the verbose schema."""
    schemas: Mapping[str, Any] = (contract.data.get("config_schemas") or {}) if contract else {}
    newest = schemas[max(schemas, key=int)] if schemas else yamldoc.schema("analysis-verbose")
    found: Mapping[str, Any] = (newest.get("$defs") or {}).get("model_params") or {}
    return found


def _model_file_params(
    model: ResolvedModel, contract: Contract | None
) -> Iterator[tuple[tuple[str | int, ...], Any]]:
    """Every param of a model (its params, each plug-in's params) that names a model file."""
    yield from marked(_model_params_schema(contract), model.params, MODEL_FILE, ("params",))
    if contract is None:
        return
    for kind in ("preprocessing", "postprocessing"):
        known = contract.plugins(kind)
        for index, step in enumerate(getattr(model, kind)):
            schema = (known.get(step.cls) or {}).get("params")
            yield from marked(schema, step.params, MODEL_FILE, (kind, index, "params"))


def file_reference_problems(
    spec: CustomerSpec, models: Sequence[ResolvedModel], contract: Contract | None
) -> list[str]:
    """Every param naming a model file (marked MODEL_FILE by the runner's contract, or by
    this builder's verbose schema when the base declares no contract) that leaves its model
    folder or is not a file the model has, at analysis.yaml:line with the model, the file
    expected and the files present: the runner would fail "file not found" on every slide."""
    origin = f"{spec.source.location}/{spec.analysis_path}"
    doc = yamldoc.parse(read_committed_file(spec, spec.analysis_path) or b"", origin)
    problems: list[str] = []
    for model in models:
        present = sorted(f.name for f in model.files)
        manual = model.sourcing == "manual"
        source = (
            f"{model.name} (folder {model.weights_uri.removeprefix('repo:')})"
            if manual
            else f"{model.name} ({model.model_id}, from the registry)"
        )
        for path, value in _model_file_params(model, contract):
            # written in analysis.yaml (manual models), or under the registry's reference
            where = _where(doc, model.name, path if manual else ("reference",))
            key = yamldoc.dotted(path)
            try:
                name = "/".join(relative_parts(str(value), what=key))
            except UnsafePathError:
                problems.append(
                    f"{where}: model {source}: {key} {str(value)[:120]!r} leaves the model "
                    "folder (absolute or '..'); a model file is a path inside it"
                )
                continue
            if name not in present:
                has = f"its files: {', '.join(present)}" if present else "it has no files"
                problems.append(
                    f"{where}: model {source}: {key} names {name!r}, which is not a file of "
                    f"the model ({has})"
                )
    return problems


def _where(doc: yamldoc.Document, model: str, path: tuple[str | int, ...]) -> str:
    """analysis.yaml:line: key of ``path`` under the model's first declaration."""
    for a_index, analysis in enumerate((doc.data or {}).get("analyses") or []):
        if isinstance(analysis, Mapping) and model in (analysis.get("models") or {}):
            full = ("analyses", a_index, "models", model, *path)
            return f"{doc.where(full)}: {yamldoc.dotted(full)}"
    return doc.origin


def require_valid(problems: Sequence[str], contract: Contract) -> None:
    """Raise one ConfigError listing every problem (none left out), in file:line order."""
    if not problems:
        return
    raise yamldoc.problems_error(
        yamldoc.in_file_order(problems),
        hint=f"the runner in {contract.source} would refuse this config; fix analysis.yaml "
        "(`tilerunner contract` lists every plug-in and param)",
    )


def require_loadable(
    spec: CustomerSpec,
    models: Sequence[ResolvedModel] | None,
    contract: Contract | None,
    *,
    verbose: Mapping[str, Any] | None = None,
    problems: Sequence[str] = (),
) -> None:
    """Raise one ConfigError listing, in file:line order, every reason the runner could not
    load this config with these models: ``problems`` found before, every model file a param
    names that the model lacks (always checked, with this builder's schema when the base
    declares no contract), and, with a contract, everything :func:`check_config` finds."""
    found = [*problems, *(file_reference_problems(spec, models, contract) if models else [])]
    if contract is not None:
        require_valid([*found, *check_config(spec, contract, models, verbose)], contract)
    elif found:
        raise yamldoc.problems_error(
            yamldoc.in_file_order(found),
            hint="the runner would not find these files: fix the params in the model registry "
            "or analysis.yaml, or publish the file they name",
        )
