"""Docker backend: the same image content built the familiar way, through a Docker engine.

A jinja2-rendered Dockerfile (``FROM base@digest``, one COPY per layer, one LABEL) and a build
context holding the same files with the same modes, built and pushed with the docker SDK. It
is the benchmark baseline and a cross-check of the default backend: both must put the same
paths, modes and bytes under /app. It is not reproducible the way the default backend is
(the classic builder stamps build times), which is one reason it is not the default.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Final

import jinja2

from builder.contracts import Progress, ProgressEvent
from builder.errors import ImageError
from builder.image.assemble import (
    DIR_MODE,
    LayerSpec,
    layer_root,
    standard_metadata,
)
from builder.image.base import BaseImage

_TEMPLATES: Final = Path(__file__).parents[1] / "templates"
_CONTEXT_ROOT: Final = "layers"


@dataclass(frozen=True)
class DockerBuild:
    """An image built by the engine."""

    image_id: str  # sha256:... (config digest in the classic image store)
    tag: str
    dockerfile: str  # the rendered Dockerfile, for logs and provenance byproducts


def dockerfile_quote(value: str) -> str:
    """Quote ``value`` for a Dockerfile LABEL: in double quotes, ``\\ " $`` escaped."""
    if "\n" in value or "\r" in value:
        raise ImageError(
            f"label value {value[:40]!r} spans lines; the docker backend cannot set it"
        )
    escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("$", "\\$")
    return f'"{escaped}"'


def render_dockerfile(
    base: str, copies: Sequence[Mapping[str, str]], labels: Mapping[str, str]
) -> str:
    """Render ``templates/Dockerfile.j2``; ``copies`` are {name, source, target} in layer order."""
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(_TEMPLATES)),
        autoescape=False,  # a Dockerfile, not HTML
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
        undefined=jinja2.StrictUndefined,
    )
    env.filters["dockerfile_label"] = lambda item: "=".join(map(dockerfile_quote, item))
    return env.get_template("Dockerfile.j2").render(
        base=base, copies=list(copies), labels=sorted(labels.items())
    )


def prepare_context(
    base: BaseImage, layers: Sequence[LayerSpec], labels: Mapping[str, str], directory: Path
) -> str:
    """Fill ``directory`` with the build context (files at their in-image paths, exact modes).

    Files are copied, never hard-linked: setting their mode must not touch the cache's copy.
    Returns the rendered Dockerfile, also written as ``directory/Dockerfile``.
    """
    if base.source != "registry":
        raise ImageError(
            f"the docker backend needs a base image in a registry, not {base.repository}",
            hint="use the default backend for OCI layout bases",
        )
    copies = []
    for index, spec in enumerate(layers):
        layer_dir = PurePosixPath(layer_root(spec))
        # One context folder per layer, so a COPY never picks up another layer's files.
        source = f"{_CONTEXT_ROOT}/{index:03d}"
        for entry in spec.entries:
            rel = PurePosixPath(entry.path).relative_to(layer_dir)
            target = directory.joinpath(source, *rel.parts)
            target.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(entry.source, bytes):
                target.write_bytes(entry.source)
            else:
                shutil.copyfile(entry.source, target)
            target.chmod(entry.mode & 0o7777)
        target_dir = layer_dir.as_posix().rstrip("/") + "/"
        copies.append({"name": spec.name, "source": f"{source}/", "target": target_dir})
    # Directories get the default backend's fixed mode whatever the umask.
    root = directory / _CONTEXT_ROOT
    for path in [root, *root.rglob("*")]:
        if path.is_dir():
            path.chmod(DIR_MODE)
    dockerfile = render_dockerfile(f"{base.repository}@{base.digest}", copies, labels)
    (directory / "Dockerfile").write_text(dockerfile, encoding="utf-8")
    return dockerfile


def build_with_docker(
    base: BaseImage,
    layers: Sequence[LayerSpec],
    *,
    labels: Mapping[str, str],
    source_date_epoch: int,
    client: Any,
    tag: str,
    progress: Progress | None = None,
) -> DockerBuild:
    """Build the image with the engine behind ``client`` (docker SDK) and tag it ``tag``.

    Labels are those :func:`~builder.image.assemble.assemble` sets (the standard OCI keys, then
    ``labels``). The engine pulls ``base@digest`` itself if it does not have it.
    """
    import docker.errors

    total = sum(len(spec.entries) for spec in layers)
    with tempfile.TemporaryDirectory(prefix="ivd-docker-context-") as tmp:
        context = Path(tmp)
        all_labels = {**standard_metadata(base, source_date_epoch), **labels}
        dockerfile = prepare_context(base, layers, all_labels, context)
        if progress is not None:
            progress(ProgressEvent("docker build context", total, total))
        try:
            image, _logs = client.images.build(
                path=str(context),
                tag=tag,
                buildargs={"SOURCE_DATE_EPOCH": str(source_date_epoch)},
                rm=True,
                forcerm=True,
                pull=False,
            )
        except docker.errors.BuildError as exc:
            raise ImageError(f"docker build failed: {_build_error(exc)}") from None
        except docker.errors.DockerException as exc:
            raise ImageError(f"docker build failed: {_first_line(exc)}") from None
    return DockerBuild(image_id=str(image.id), tag=tag, dockerfile=dockerfile)


def push_with_docker(
    client: Any,
    image: str,
    targets: Sequence[str],
    *,
    auth_config: Mapping[str, str] | None = None,
    progress: Progress | None = None,
) -> str:
    """Tag ``image`` as each ``registry/repo:tag`` and push it; return the manifest digest."""
    import docker.errors

    digest = ""
    try:
        local = client.images.get(image)
        for target in targets:
            repository, _, tag = target.rpartition(":")
            if not repository or "/" in tag:
                raise ImageError(f"push target {target!r} must be registry/repository:tag")
            local.tag(repository, tag=tag)
            stream = client.images.push(
                repository,
                tag=tag,
                stream=True,
                decode=True,
                auth_config=dict(auth_config) if auth_config else None,
            )
            for event in stream:
                if "error" in event:
                    detail = event.get("errorDetail", {}).get("message") or event["error"]
                    raise ImageError(f"docker push {target} failed: {detail}")
                aux = event.get("aux") or {}
                if aux.get("Digest"):
                    digest = str(aux["Digest"])
                detail = event.get("progressDetail") or {}
                if progress is not None and detail.get("total"):
                    progress(
                        ProgressEvent(
                            f"docker push {event.get('id', '')}", detail["current"], detail["total"]
                        )
                    )
    except docker.errors.DockerException as exc:
        raise ImageError(f"docker push failed: {_first_line(exc)}") from None
    if not digest:
        raise ImageError(f"docker push of {image} reported no digest")
    return digest


def _first_line(exc: BaseException) -> str:
    text = str(getattr(exc, "explanation", None) or exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _build_error(exc: Any) -> str:
    """The engine's own error line from a BuildError's log, else its message."""
    for entry in reversed(list(getattr(exc, "build_log", []) or [])):
        if isinstance(entry, dict) and entry.get("error"):
            return str(entry["error"]).strip()
    return _first_line(exc)
