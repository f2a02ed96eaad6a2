"""`history`, `diff`, `explain`, `verify`, `audit`: what shipped, what changed, does it rebuild.

`explain` and `verify` print their whole finding and then exit with code 10 when a check
failed (a modified model file, a digest mismatch, a bad signature), also in --json mode where
the result says ``"ok_checks": false`` / ``"match": false``.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

import click

from builder.cli._common import cli, info, load_cli_settings
from builder.cli.options import insecure_registry_option, json_option, settings_options
from builder.cli.result import Result
from builder.errors import AUDIT_FAILED, ConfigError

_REF_HELP = (
    "Revision to read: a branch, tag or commit, a release tag (2.5.0-1a2b3c4d5e6f) or an image "
    "reference. Default: the customer's branch in the fleet file, else HEAD."
)
_CUSTOMER_HELP = (
    "CUSTOMER is a name (looked up in the customers folder, then its fleet.yaml, wherever the "
    "settings point), a folder, or a repository URL as the tool prints it (URL#folder)."
)


def _revision_lines(entry: Any, indent: str = "    ", *, notes: bool = True) -> list[str]:
    """A revision's reason, changes, today's-rules note, approval and releases, for people
    (without ``notes`` only what the revision changed, not how its models were read)."""
    from builder.audit.approvals import ApprovalStatus

    lines = [f"{indent}{line}" for line in (entry.revision.reason or "").splitlines()[1:] if line]
    if entry.error:
        lines.append(f"{indent}! could not be read: {entry.error}")
    if entry.rule_note:
        lines.append(f"{indent}note: {entry.rule_note}")
    lines += [f"{indent}- {c.text}" for c in entry.changes if notes or c.kind != "lock"]
    if entry.config is not None and notes:
        lines += [
            f"{indent}note: {note}" for note in entry.config.notes if not note.startswith("read as")
        ]
    approval = entry.approval
    if approval is not None and (approval.status != ApprovalStatus.PENDING or entry.releases):
        mark = "! " if approval.status == ApprovalStatus.UNAPPROVED else ""
        lines.append(f"{indent}{mark}{approval.sentence}")
    for record in entry.releases:
        lines.append(
            f"{indent}released: {record.image}@{record.manifest_digest} "
            f"on base {record.base_version} ({record.built_at or 'time not recorded'})"
        )
    return lines


def _entry_json(entry: Any) -> dict[str, Any]:
    data: dict[str, Any] = asdict(entry)
    data["rule_note"] = entry.rule_note
    if entry.approval is not None:
        data["approval"]["sentence"] = entry.approval.sentence
        data["approval"]["covered"] = entry.approval.covered
    return data


@cli.command("history")
@click.argument("customer")
@click.option("--ref", default=None, help=_REF_HELP)
@settings_options
@json_option
def history_cmd(customer: str, ref: str | None, as_json: bool, **overrides: Any) -> Result:
    """The timeline of CUSTOMER's config revisions: what changed and why (the commit message),
    the approval that covers each change, and which images were released.

    Models are read from each revision's lock file; without one the model registry is asked as
    it is now (the output says so). A release's approval covers every change since the previous
    release: trailers (Approved-by:, Reviewed-by:, Acked-by:) on the change or a later revision
    up to the release, or on the merge commit that brought it in, and its merge request. A
    released change that no approval covers is flagged. An old revision that today's validation
    refuses is read as written and says which rule. CUSTOMER as for every audit command: a
    name, a folder or a repository URL (URL#folder as printed).
    """
    from builder.audit.history import history
    from builder.audit.locate import locate_customer

    settings = load_cli_settings(overrides)
    located = locate_customer(customer, settings)
    hist = history(located.location, settings, ref=ref or located.ref)

    def human() -> None:
        click.echo(f"{hist.customer}  {hist.repository}  ({len(hist.entries)} revisions)")
        for entry in hist.entries:
            rev = entry.revision
            click.echo(f"\n{rev.commit[:12]}  {rev.date}  {rev.author}\n    {rev.message}")
            for line in _revision_lines(entry):
                click.echo(line)
        for problem in hist.problems:
            click.echo(f"\nproblem: {problem}", err=True)

    data = asdict(hist)
    data["entries"] = [_entry_json(e) for e in hist.entries]
    data["unapproved"] = [e.revision.commit for e in hist.unapproved]
    notes = tuple(
        f"not approved: {e.revision.commit[:12]} {e.revision.message!r} was released and no "
        "approval covers it"
        for e in hist.unapproved
    )
    return Result("history", data, human, notes=notes)


def _point_line(label: str, point: Any, revision: Any) -> str:
    what = f"{revision.commit[:12]} ({revision.date}) {revision.message!r}"
    if point is None or point.via == "git":
        return f"{label} {what}"
    kind = "release" if point.via == "release" else "image (no release record)"
    base = point.shipped or {}
    return f"{label} {kind} {point.image}, base {base.get('version')} shipped: {what}"


@cli.command("diff")
@click.argument("customer")
@click.argument("rev_a")
@click.argument("rev_b")
@insecure_registry_option
@settings_options
@json_option
def diff_cmd(
    customer: str,
    rev_a: str,
    rev_b: str,
    insecure_registry: bool,
    as_json: bool,
    **overrides: Any,
) -> Result:
    """What changed in CUSTOMER's resolved config from REV_A to REV_B (models, tasks, weights,
    thresholds, base), not a text diff; and, for each change, the revisions that made it, their
    reasons and the approvals that cover them.

    REV_A and REV_B are branches, tags or commits, release tags (2.5.0-1a2b3c4d5e6f) or image
    references (a registry reference, oci:DIR:TAG, a docker archive): between two releases the
    base is compared as shipped. CUSTOMER: a name, a folder or a repository URL (URL#folder).
    """
    from builder.audit.approvals import ApprovalStatus
    from builder.audit.history import diff
    from builder.audit.locate import locate_customer

    settings = load_cli_settings(overrides)
    located = locate_customer(customer, settings)
    result = diff(
        located.location,
        settings,
        rev_a,
        rev_b,
        branch=located.ref,
        insecure=True if insecure_registry else None,
    )

    def human() -> None:
        click.echo(f"{result.customer}: {rev_a} -> {rev_b}")
        click.echo(_point_line("  from", result.point_a, result.a))
        click.echo(_point_line("  to  ", result.point_b, result.b))
        click.echo("changes:" if result.changes else "  no change in resolved terms")
        for change in result.changes:
            by = ", ".join(c[:12] for c in change.revisions)
            click.echo(f"  {change.text}" + (f"  [{by}]" if by else ""))
        if result.revisions:
            click.echo("revisions (why, and who approved):")
        for entry in result.revisions:
            rev = entry.revision
            click.echo(f"  {rev.commit[:12]}  {rev.date}  {rev.author}  {rev.message}")
            for line in _revision_lines(entry, "      "):
                if not line.lstrip().startswith("- "):
                    click.echo(line)
        for note in sorted({*result.config_a.notes, *result.config_b.notes}):
            click.echo(f"note: {note}", err=True)

    data = asdict(result)
    data["revisions"] = [_entry_json(e) for e in result.revisions]
    data["unapproved"] = [e.revision.commit for e in result.unapproved]
    notes = tuple(
        f"not approved: {e.revision.commit[:12]} {e.revision.message!r}: no approval covers it"
        for e in result.unapproved
        if e.approval is not None and e.approval.status == ApprovalStatus.UNAPPROVED
    )
    return Result("diff", data, human, notes=notes)


def _explanation_lines(exp: Any) -> list[str]:
    from builder.audit.explain import FileState

    prov = exp.provenance
    base = exp.base
    lines = [f"verdict      {exp.verdict_line()}"]
    if exp.selected:
        sel = exp.selected
        lines += [
            f"shipped      {sel['customer']}: newest of {sel['records_considered']} matching release "
            f"record(s) ({sel['records_total']} in all): {sel['release_image']}",
            f"             {sel['registry_note']}",
        ]
    lines += [
        f"image        {exp.image}",
        f"digest       {exp.manifest_digest}",
        f"customer     {exp.customer}",
        f"config       {_repository_line(prov.config_repository, exp.source)} @ "
        f"{prov.config_commit}",
        f"             folder {prov.config_path}, analysis {prov.config_analysis}",
        f"base         {base.get('repository')}:{base.get('version')}@{base.get('digest')}",
        f"tool         {prov.builder_name} {prov.builder_version}",
        f"created      {exp.created} (config commit time)",
        f"built        {exp.built_at or 'unknown (no attestation or release record)'}"
        + (f" (from the {exp.built_at_source})" if exp.built_at_source else ""),
    ]
    if exp.ci_url:
        lines.append(f"CI job       {exp.ci_url}")
    if prov.development_build:
        lines.append("DEVELOPMENT BUILD: unpublished models; not for release")
    for model in prov.models:
        ident = (
            f"{model.registry_id} ({model.registry_name}) task {model.task_id}"
            if model.registry_id
            else f"shipped in the config repository ({model.weights_uri})"
        )
        lines.append(f"model        {model.name}: {ident}")
        for f in exp.files:
            if f.model == model.name:
                lines.append(f"               {f.file:<20} sha256 {f.recorded_sha256}  {f.status}")
    for f in exp.files:
        if f.status == FileState.UNEXPECTED:
            lines.append(f"unexpected   /app/models/{f.model}/{f.file} (sha256 {f.image_sha256})")
    if exp.attestations:
        for a in exp.attestations:
            signed = (
                f", signed by key {a.key_id[:16] if a.key_id else '?'}: signature {a.signature}"
                if a.signed
                else ""
            )
            lines.append(f"attestation  {a.kind} {a.digest[:19]} ({a.artifact_type}{signed})")
    else:
        lines.append(f"attestation  none ({exp.attestations_where})")
    lines.append(f"release      {exp.release_note}")
    lines += _review_lines(exp.review)
    lines += [f"FAILED       {c.name}: {c.detail}" for c in exp.checks if not c.ok]
    return lines


def _review_lines(review: Any) -> list[str]:
    """Who approved a release, and what changed since the previous release and why."""
    if review is None:
        return []
    missing = review.unapproved
    approved = "; ".join(review.approvals) or "nobody (no approval trailer or merge request)"
    lines = [f"approved     {approved}"]
    if missing:
        lines.append(
            f"NOT APPROVED {len(missing)} change(s) of this release no approval covers: "
            + ", ".join(f"{e.revision.commit[:12]} {e.revision.message!r}" for e in missing)
        )
    previous = review.previous
    since = (
        f"since {previous.image} (built {previous.built_at}): {len(review.revisions)} revision(s)"
        if previous
        else f"first release: {len(review.revisions)} revision(s)"
    )
    lines.append(f"changes      {since}")
    for entry in review.revisions:
        rev = entry.revision
        lines.append(f"  {rev.commit[:12]}  {rev.date}  {rev.author}  {rev.message}")
        lines += _revision_lines(entry, "      ", notes=False)
    if previous and not review.revisions:
        lines += [f"  - {c.text}" for c in review.changes] or ["  no change"]
    return lines


_SELECT_OPTIONS = (
    click.option(
        "--base-version",
        help="With a customer name: the newest release on this base version line (2.4 or 2.4.1).",
    ),
    click.option(
        "--at",
        "at",
        metavar="DATE",
        help="With a customer name: what was shipped as of DATE (YYYY-MM-DD or RFC 3339, UTC).",
    ),
)


def _select_options(func: Any) -> Any:
    for option in reversed(_SELECT_OPTIONS):
        func = option(func)
    return func


def _target(
    target: str, settings: Any, base_version: str | None, at: str | None, insecure: bool | None
) -> tuple[str, dict[str, Any] | None]:
    """An image reference as given, or the image a customer name was shipped (release records)."""
    from builder.audit.locate import image_target

    return image_target(target, settings, base_version=base_version, at=at, insecure=insecure)


@cli.command("explain")
@click.argument("image", metavar="IMAGE|CUSTOMER")
@click.option(
    "--public-key",
    type=click.Path(path_type=Path, dir_okay=False),
    help="PEM public key (ECDSA P-256): require a provenance signed by it.",
)
@insecure_registry_option
@_select_options
@settings_options
@json_option
def explain_cmd(
    image: str,
    public_key: Path | None,
    insecure_registry: bool,
    base_version: str | None,
    at: str | None,
    as_json: bool,
    **overrides: Any,
) -> Result:
    """What IMAGE is: customer, config commit, base, models (ids, task, sha256), tool, build time.

    IMAGE is a registry reference (host/repo:tag or @sha256:...), an OCI layout (a folder, or
    oci:DIR[:TAG]) or a docker archive (a file, or docker-archive:FILE). A bare CUSTOMER name
    explains what that customer was shipped: the newest release record (--base-version, --at
    narrow it), and where the registry's moving tag points now. The first line is the verdict:
    recorded release, signed (by which key), files intact. The model files inside are hashed
    and checked against the recorded sha256; exit code 10 if any check fails.
    """
    from builder.audit.explain import explain

    settings = load_cli_settings(overrides)
    insecure = True if insecure_registry else None
    reference, selected = _target(image, settings, base_version, at, insecure)
    exp = explain(reference, settings, public_key=public_key, insecure=insecure)
    exp.selected = selected
    data = asdict(exp)
    data["provenance"] = exp.provenance.to_dict()  # as the image holds it
    data["ok_checks"] = exp.ok
    data["verdict"] = exp.verdict
    return Result(
        "explain",
        data,
        lambda: click.echo("\n".join(_explanation_lines(exp))),
        exit_code=0 if exp.ok else AUDIT_FAILED,
        notes=() if exp.ok else (f"explain: {len(exp.problems)} check(s) failed for {image}",),
    )


def _repository_line(recorded: str | None, source: str | None) -> str:
    """The config repository an image records; for a location-free image that records none,
    the one its provenance attestation names, said so."""
    if recorded:
        return recorded
    return f"{source} (named by the attestation)" if source else "(not recorded)"


@cli.command("verify")
@click.argument("image", metavar="IMAGE|CUSTOMER")
@click.option(
    "--repo",
    type=click.Path(path_type=Path, file_okay=False),
    help="A clone of the config repository (default: the recorded repository, cloned into the "
    "cache if it is not on this machine).",
)
@insecure_registry_option
@_select_options
@settings_options
@json_option
def verify_cmd(
    image: str,
    repo: Path | None,
    insecure_registry: bool,
    base_version: str | None,
    at: str | None,
    as_json: bool,
    **overrides: Any,
) -> Result:
    """Rebuild IMAGE from its recorded config commit, lock and base; print MATCH or what differs.

    Needs nothing but the image reference (or a CUSTOMER name, as for explain): the config
    repository the image records (else the one its provenance attestation names; a folder of
    it for folder customers) is used where it is on this machine, work tree or bare, and cloned
    with the CI credential helper when it is not; the lock at the recorded commit gives the
    models, the production store and the base repository, not the working directory's
    settings. An image of an older format is rebuilt with that format and the locations it
    recorded. Every layer is re-tarred in a scratch blob store (weights come from the verified
    cache). Exit code 10 on a mismatch.
    """
    from builder.audit.verify import verify

    settings = load_cli_settings(overrides)
    insecure = True if insecure_registry else None
    reference, _selected = _target(image, settings, base_version, at, insecure)
    info(f"==> rebuilding {reference} from its recorded inputs")
    result = verify(reference, settings, repo=repo, insecure=insecure)
    data = asdict(result)
    data["explanation"]["provenance"] = result.explanation.provenance.to_dict()
    data["explanation"]["ok_checks"] = result.explanation.ok

    def human() -> None:
        click.echo(f"image      {result.image}")
        click.echo(
            f"config     {result.repository} @ {result.commit} ({'locked' if result.locked else 'no lock'})"
        )
        click.echo(
            f"base       {result.base.get('repository')}:{result.base.get('version')}@{result.base.get('digest')}"
        )
        for note in result.notes:
            click.echo(f"note       {note}")
        click.echo(f"image      {result.manifest_digest}")
        click.echo(f"rebuilt    {result.rebuilt_digest}")
        click.echo("MATCH" if result.match else "MISMATCH")
        for line in result.differences:
            click.echo(f"  differs: {line}")

    return Result("verify", data, human, exit_code=0 if result.match else AUDIT_FAILED)


@cli.command("audit")
@click.argument("customer")
@click.option(
    "--html",
    "html",
    type=click.Path(path_type=Path, dir_okay=False),
    help="Write the self-contained HTML report here.",
)
@click.option(
    "--pdf",
    "pdf",
    type=click.Path(path_type=Path, dir_okay=False),
    help="Write the report as a PDF here (A4; page numbers and generation date on every page).",
)
@click.option("--ref", default=None, help=_REF_HELP)
@click.option(
    "--verify",
    "verify_releases",
    is_flag=True,
    help="Also rebuild every recorded release (builder verify) and show MATCH or what differs.",
)
@settings_options
@json_option
def audit_cmd(
    customer: str,
    html: Path | None,
    pdf: Path | None,
    ref: str | None,
    verify_releases: bool,
    as_json: bool,
    **overrides: Any,
) -> Result:
    """Write the audit report of CUSTOMER for regulatory review, as HTML (--html) and/or PDF
    (--pdf): what runs at the customer, where each model came from, who approved each release
    and each change, what changed since the previous release and why, whether it rebuilds
    (--verify); the configuration timeline, model lineage, and registry tags that no release
    record names. One self-contained file, no network resources; it prints cleanly.
    CUSTOMER: a name, a folder or a repository URL (URL#folder as printed). With --verify,
    exit code 10 when a release does not MATCH or could not be verified (one line each says
    why)."""
    from builder.audit.report import write_report

    if html is None and pdf is None:
        raise ConfigError(
            "builder audit: say where to write the report: --html FILE and/or --pdf FILE"
        )
    data = write_report(
        customer,
        load_cli_settings(overrides),
        html=html,
        pdf=pdf,
        ref=ref,
        verify_releases=verify_releases,
    )
    records = {r.path: r for r in data["releases"]}
    failed = {
        path: status for path, status in data["verified"].items() if status["state"] != "MATCH"
    }
    written = [str(p) for p in (html, pdf) if p is not None]
    summary = {
        "customer": data["customer"],
        "report": str(html) if html is not None else None,
        "pdf": str(pdf) if pdf is not None else None,
        "revisions": len(data["entries"]),
        "releases": len(data["releases"]),
        "unapproved": [e.revision.commit for e in data["unapproved"]],
        "unrecorded_tags": data["unrecorded_tags"],
        "problems": data["problems"],
        "verified": data["verified"],
    }

    return Result(
        "audit",
        summary,
        lambda: click.echo(
            f"wrote {' and '.join(written)}: {summary['revisions']} revisions, "
            f"{summary['releases']} releases"
            + (
                f", {len(summary['unapproved'])} released changes not approved"
                if summary["unapproved"]
                else ""
            )
            + (f", {len(data['problems'])} problems" if data["problems"] else "")
        ),
        exit_code=AUDIT_FAILED if failed else 0,
        notes=tuple(
            f"{status['state']}: {records[path].image if path in records else path}: "
            f"{status['detail']}"
            for path, status in failed.items()
        ),
    )
