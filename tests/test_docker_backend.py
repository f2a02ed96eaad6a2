"""Docker backend: the rendered Dockerfile, its build context, parity with the default backend."""

from __future__ import annotations

import hashlib
import io
import os
import secrets
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_assemble import LABELS, SDE, layer_specs, make_base_layout, model_tree
from test_deliver import docker_push

from builder.deliver import push
from builder.errors import ImageError
from builder.image.assemble import (
    LAYER_FORMAT,
    LAYER_FORMAT_LABEL,
    FileEntry,
    LayerSpec,
    assemble,
)
from builder.image.base import BaseImage, resolve_base
from builder.image.docker_backend import (
    build_with_docker,
    dockerfile_quote,
    prepare_context,
    push_with_docker,
    render_dockerfile,
)
from builder.oci import BlobStore, RegistryClient, RetryPolicy
from testbed.docker_engine import Engine
from testbed.registry import Registry

FAST = RetryPolicy(attempts=3, backoff=0.05, max_backoff=0.2)
DIGEST = "sha256:" + "ab" * 32


class TestDockerfile:
    def test_render(self) -> None:
        """FROM by digest, one COPY per layer in order (JSON form), one LABEL, quoted."""
        text = render_dockerfile(
            f"127.0.0.1:5000/ivd/base@{DIGEST}",
            [
                {"name": "m1", "source": "layers/000/", "target": "/app/models/m1/"},
                {"name": "config", "source": "layers/001/", "target": "/app/config/"},
            ],
            {"b.key": 'say "hi" $HOME \\o/', "a.key": "1"},
        )
        lines = [line for line in text.splitlines() if line and not line.startswith("#")]
        assert lines == [
            f"FROM 127.0.0.1:5000/ivd/base@{DIGEST}",
            "ARG SOURCE_DATE_EPOCH",
            'COPY ["layers/000/", "/app/models/m1/"]',
            'COPY ["layers/001/", "/app/config/"]',
            'LABEL "a.key"="1" \\',
            '      "b.key"="say \\"hi\\" \\$HOME \\\\o/"',
        ]

    def test_multiline_label_refused(self) -> None:
        """A label value with a newline cannot be expressed; say so."""
        with pytest.raises(ImageError, match="spans lines"):
            dockerfile_quote("a\nb")

    def test_context_has_the_files_with_exact_modes(self, tmp_path: Path) -> None:
        """Each layer in its own folder; file modes as asked, directories 0755, any umask."""
        base_layout = tmp_path / "base"
        make_base_layout(base_layout)
        layout_base = resolve_base(f"oci:{base_layout}", "~=1.0")
        registry_base = BaseImage(**{**layout_base.__dict__, "source": "registry", "layout": None})
        files = model_tree(tmp_path / "weights")
        old = os.umask(0o077)
        try:
            dockerfile = prepare_context(registry_base, layer_specs(files), {}, tmp_path / "ctx")
        finally:
            os.umask(old)
        ctx = tmp_path / "ctx"
        assert "COPY " in dockerfile and (ctx / "Dockerfile").read_text() == dockerfile
        assert (ctx / "layers/001/sub/extra.txt").stat().st_mode & 0o777 == 0o600
        assert (ctx / "layers/002/run.sh").stat().st_mode & 0o777 == 0o755
        assert (ctx / "layers/000/model.onnx").read_bytes() == files[
            "carcinoma/model.onnx"
        ].read_bytes()
        assert all(
            p.stat().st_mode & 0o777 == 0o755 for p in (ctx / "layers").rglob("*") if p.is_dir()
        )
        with pytest.raises(ImageError, match="needs a base image in a registry"):
            prepare_context(layout_base, layer_specs(files), {}, tmp_path / "ctx2")


# -- against the engine and the registry ---------------------------------------------------------


def app_tree(client: Any, image: str) -> dict[str, tuple[str, int, int, int, str]]:
    """path -> (type, mode, uid, gid, sha256) for everything under /app in ``image``."""
    container = client.containers.create(image, command=["true"], network_mode="none")
    try:
        stream, _ = container.get_archive("/app")
        data = b"".join(stream)
    finally:
        container.remove(force=True)
    tree = {}
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        for member in tar.getmembers():
            digest = ""
            if member.isfile():
                extracted = tar.extractfile(member)
                assert extracted is not None
                digest = hashlib.sha256(extracted.read()).hexdigest()
            kind = "dir" if member.isdir() else "file" if member.isfile() else "other"
            tree[member.name] = (kind, member.mode & 0o7777, member.uid, member.gid, digest)
    return tree


@pytest.fixture(scope="module")
def docker_client(docker_engine: Engine) -> Iterator[Any]:
    client = docker_engine.client()
    yield client
    client.close()


@pytest.fixture(scope="module")
def registry_base(oci_registry: Registry, docker_client: Any, base_os_image: str) -> BaseImage:
    docker_push(docker_client, base_os_image, f"{oci_registry.host}/ivd/backend-base", "3.0.0")
    return resolve_base(f"{oci_registry.host}/ivd/backend-base", "3.0.0", retry=FAST)


@pytest.mark.docker
class TestEngine:
    def test_same_files_labels_and_config_as_the_default_backend(
        self,
        oci_registry: Registry,
        docker_client: Any,
        registry_base: BaseImage,
        tmp_path: Path,
    ) -> None:
        """Both backends put the same paths, modes, owners and bytes under /app, same labels."""
        files = model_tree(tmp_path / "weights")
        specs = layer_specs(files)
        ours = assemble(
            registry_base,
            specs,
            labels=LABELS,
            annotations={},
            source_date_epoch=SDE,
            store=BlobStore(tmp_path / "cache"),
        )
        target = f"{oci_registry.host}/test-{secrets.token_hex(4)}/backends"
        push(ours, [f"{target}:default"], retry=FAST)
        pulled = docker_client.images.pull(target, tag="default")
        tag = f"ivd-test/backends:docker-{secrets.token_hex(3)}"
        built = build_with_docker(
            registry_base,
            specs,
            labels=LABELS,
            source_date_epoch=SDE,
            client=docker_client,
            tag=tag,
        )
        try:
            theirs = docker_client.images.get(built.image_id)
            tree = app_tree(docker_client, pulled.id)
            assert tree["app/config/run.sh"][:4] == ("file", 0o755, 0, 0)
            assert tree["app/models/mitosis/sub/extra.txt"][:4] == ("file", 0o600, 0, 0)
            assert tree["app/models"][:4] == ("dir", 0o755, 0, 0)
            assert app_tree(docker_client, built.image_id) == tree
            # The format label describes our image bytes; Docker's layers follow Docker's.
            assert {**theirs.labels, LAYER_FORMAT_LABEL: str(LAYER_FORMAT)} == pulled.labels
            for key in ("Env", "Cmd", "Entrypoint", "WorkingDir", "User"):
                assert theirs.attrs["Config"].get(key) == pulled.attrs["Config"].get(key), key

            digest = push_with_docker(docker_client, tag, [f"{target}:docker"])
            client = RegistryClient(oci_registry.host, retry=FAST)
            assert client.manifest_digest(target.split("/", 1)[1], "docker") == digest
        finally:
            docker_client.images.remove(tag, force=True)
            docker_client.images.remove(f"{target}:default", force=True)

    def test_build_error_is_one_line(
        self, docker_client: Any, registry_base: BaseImage, tmp_path: Path
    ) -> None:
        """A failing build (base digest unknown to the registry) is an ImageError."""
        missing = BaseImage(**{**registry_base.__dict__, "digest": DIGEST})
        spec = [LayerSpec("config", [FileEntry("/app/config/x", b"x")])]
        with pytest.raises(ImageError, match="docker build failed"):
            build_with_docker(
                missing,
                spec,
                labels={},
                source_date_epoch=SDE,
                client=docker_client,
                tag="ivd-test/x:1",
            )
