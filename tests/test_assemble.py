"""Assemble stage without services: deterministic layers, config, manifest, blob store, layouts.

The base image here is synthetic (a Docker v2 schema 2 image written as an OCI layout), so
these tests need no registry and no Docker engine; skopeo reads what we write.
"""

from __future__ import annotations

import dataclasses
import errno
import gzip
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

from builder.deliver import write_docker_archive, write_oci_layout
from builder.errors import ImageError
from builder.image.assemble import (
    BASE_NAME_LABEL,
    COMPRESS_RATIO,
    CONTENT_MTIME,
    LAYER_FORMAT,
    LAYER_FORMAT_LABEL,
    AssembledImage,
    FileEntry,
    LayerSpec,
    assemble,
    rfc3339,
)
from builder.image.base import BaseImage, resolve_base, select_version
from builder.oci import (
    DOCKER_CONFIG,
    DOCKER_LAYER_GZIP,
    DOCKER_MANIFEST,
    OCI_CONFIG,
    OCI_INDEX,
    OCI_LAYER,
    OCI_LAYER_GZIP,
    OCI_MANIFEST,
    REF_NAME,
    BlobStore,
    BlobWriter,
    Descriptor,
    canonical_json,
    read_layout_index,
    sha256_digest,
    write_layout_index,
)

ROOT = Path(__file__).resolve().parents[1]
SDE = 1_700_000_000
BASE_TAGS = ("1.0.0", "1.1.0", "1.2.0rc1", "2.0.0", "latest")
BASE_LABELS = {"com.ivd.runner.config-schemas": "1,2", "org.example.base": "yes"}


# -- helpers (also used by test_deliver and test_docker_backend) ---------------------------------


def base_layer_tar() -> bytes:
    """A tiny root filesystem layer, uncompressed."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in (("etc/os-release", b"ID=synthetic\n"), ("etc/hostname", b"base\n")):
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), 0o644
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def synthetic_base_blobs(labels: Mapping[str, str] | None = None) -> tuple[bytes, bytes, bytes]:
    """(manifest, config, gzip layer) of a Docker v2 schema 2 base image (``labels`` added to
    its own)."""
    raw = base_layer_tar()
    layer = gzip.compress(raw, mtime=0)
    config = {
        "architecture": "amd64",
        "os": "linux",
        "config": {
            "Env": ["PATH=/usr/bin:/bin", "LANG=C.UTF-8"],
            "Cmd": ["python3"],
            "WorkingDir": "/srv",
            "User": "1000:1000",
            "ExposedPorts": {"8080/tcp": {}},
            "StopSignal": "SIGTERM",
            "Labels": {**BASE_LABELS, **(labels or {})},
            "Hostname": "build-host-must-not-leak",
        },
        "container_config": {"Hostname": "build-host-must-not-leak"},
        "docker_version": "20.10",
        "rootfs": {"type": "layers", "diff_ids": [sha256_digest(raw)]},
        "history": [{"created": "2024-01-01T00:00:00Z", "created_by": "synthetic base"}],
    }
    config_bytes = canonical_json(config)
    manifest = {
        "schemaVersion": 2,
        "mediaType": DOCKER_MANIFEST,
        "config": {
            "mediaType": DOCKER_CONFIG,
            "digest": sha256_digest(config_bytes),
            "size": len(config_bytes),
        },
        "layers": [
            {"mediaType": DOCKER_LAYER_GZIP, "digest": sha256_digest(layer), "size": len(layer)}
        ],
    }
    return canonical_json(manifest), config_bytes, layer


def make_base_layout(directory: Path, tags: Sequence[str] = BASE_TAGS) -> str:
    """Write the synthetic base as an OCI image layout with ``tags``; return its digest."""
    manifest, config, layer = synthetic_base_blobs()
    blobs = directory / "blobs" / "sha256"
    blobs.mkdir(parents=True, exist_ok=True)
    for data in (manifest, config, layer):
        (blobs / sha256_digest(data).split(":")[1]).write_bytes(data)
    descriptor = Descriptor(DOCKER_MANIFEST, sha256_digest(manifest), len(manifest))
    write_layout_index(directory, descriptor, list(tags))
    return descriptor.digest


def model_tree(directory: Path) -> dict[str, Path]:
    """Source files for two models, as the fetch cache would hold them."""
    directory.mkdir(parents=True, exist_ok=True)
    files = {
        "carcinoma/model.onnx": os.urandom(3 << 20),  # incompressible: stays uncompressed
        "carcinoma/labels.json": b'{"0": "benign", "1": "carcinoma"}\n',
        "mitosis/model.onnx": b"\x08\x07" + bytes(range(256)) * 400,
        "mitosis/sub/extra.txt": b"extra\n",
    }
    out = {}
    for rel, data in files.items():
        path = directory / rel.replace("/", "__")
        path.write_bytes(data)
        out[rel] = path
    return out


def layer_specs(files: dict[str, Path], *, with_sha: bool = False) -> list[LayerSpec]:
    """One layer per model plus the config layer, as the pipeline passes them."""

    def entry(rel: str, mode: int = 0o644) -> FileEntry:
        path = files[rel]
        sha = hashlib.sha256(path.read_bytes()).hexdigest() if with_sha else None
        return FileEntry(f"/app/models/{rel}", path, mode, sha)

    return [
        LayerSpec("carcinoma", [entry("carcinoma/model.onnx"), entry("carcinoma/labels.json")]),
        LayerSpec("mitosis", [entry("mitosis/sub/extra.txt", 0o600), entry("mitosis/model.onnx")]),
        LayerSpec(
            "config",
            [
                FileEntry("/app/config/analysis.yaml", b"analyses: []\n"),
                FileEntry("/app/config/run.sh", b"#!/bin/sh\nexec python3 -m runner\n", 0o755),
            ],
            stamped=True,
        ),
    ]


LABELS = {"com.ivd.customer": "customer-x", "org.opencontainers.image.revision": "abc123"}
ANNOTATIONS = {"org.opencontainers.image.source": "https://git.example/customers.git"}


def build(base: BaseImage, files: dict[str, Path], store: BlobStore, **kw: Any) -> AssembledImage:
    """assemble() with the test inputs."""
    return assemble(
        base,
        layer_specs(files, with_sha=kw.pop("with_sha", False)),
        labels=kw.pop("labels", LABELS),
        annotations=ANNOTATIONS,
        source_date_epoch=SDE,
        store=store,
        **kw,
    )


def tar_members(data: bytes) -> list[tarfile.TarInfo]:
    """Members of a (possibly gzipped) tar blob."""
    if data[:2] == b"\x1f\x8b":
        data = gzip.decompress(data)
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
        return tar.getmembers()


def skopeo(*args: str) -> str:
    """Run skopeo; fail the test with its stderr."""
    binary = shutil.which("skopeo")
    if binary is None:
        pytest.skip("skopeo is not installed")
    done = subprocess.run([binary, *args], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    return done.stdout


# -- fixtures ------------------------------------------------------------------------------------


@pytest.fixture
def base_layout(tmp_path: Path) -> Path:
    layout = tmp_path / "bases"
    make_base_layout(layout)
    return layout


@pytest.fixture
def base(base_layout: Path) -> BaseImage:
    return resolve_base(f"oci:{base_layout}", "~=1.0")


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    return model_tree(tmp_path / "weights")


@pytest.fixture
def store(tmp_path: Path) -> BlobStore:
    return BlobStore(tmp_path / "cache")


# -- resolving the base --------------------------------------------------------------------------


class TestSelectVersion:
    def test_exact_version(self) -> None:
        """An exact version picks that tag, prereleases included."""
        assert select_version(BASE_TAGS, "1.0.0", what="x") == "1.0.0"
        assert select_version(BASE_TAGS, "1.2.0rc1", what="x") == "1.2.0rc1"

    def test_exact_version_compares_as_version(self) -> None:
        """'v2.4.1' or '2.4.1.0' tags satisfy an exact '2.4.1'."""
        assert select_version(["v2.4.1", "latest"], "2.4.1", what="x") == "v2.4.1"

    def test_specifier_picks_highest_final_release(self) -> None:
        """A specifier picks the highest match and ignores prereleases and 'latest'."""
        assert select_version(BASE_TAGS, "~=1.0", what="x") == "1.1.0"
        assert select_version(BASE_TAGS, ">=1.0,<3", what="x") == "2.0.0"
        assert select_version(BASE_TAGS, "==1.2.0rc1", what="x") == "1.2.0rc1"

    def test_missing_exact_tag_lists_what_exists(self) -> None:
        """A missing tag names the image and the versions it has."""
        with pytest.raises(
            ImageError, match=r"img has no tag 1\.0\.7 \(available: 1\.0\.0, 1\.1\.0"
        ):
            select_version(BASE_TAGS, "1.0.7", what="img")

    def test_unsatisfiable_constraint_lists_what_exists(self) -> None:
        """No matching version: the message lists the versions (non-version tags left out)."""
        with pytest.raises(ImageError) as info:
            select_version(BASE_TAGS, "~=3.1", what="img")
        assert "no version of img satisfies '~=3.1'" in str(info.value)
        assert "2.0.0" in str(info.value) and "latest" not in str(info.value)

    def test_invalid_constraint(self) -> None:
        """Garbage in the version field is one clear error."""
        with pytest.raises(ImageError, match="invalid base image version constraint"):
            select_version(BASE_TAGS, "about two", what="img")


class TestResolveLayout:
    def test_resolves_by_constraint_and_reads_labels(self, base_layout: Path) -> None:
        """oci:PATH resolves like a registry; labels and layers come from the config/manifest."""
        base = resolve_base(f"oci:{base_layout}", "~=1.0")
        manifest, _, layer = synthetic_base_blobs()
        assert base.version == "1.1.0"
        assert base.digest == sha256_digest(manifest)
        assert base.source == "oci-layout"
        assert base.labels["com.ivd.runner.config-schemas"] == "1,2"
        assert [d.media_type for d in base.layers] == [DOCKER_LAYER_GZIP]
        assert base.layers[0].digest == sha256_digest(layer)
        assert base.ref.digest == base.digest

    def test_explicit_tag(self, base_layout: Path) -> None:
        """oci:PATH:TAG names the image directly."""
        assert resolve_base(f"oci:{base_layout}:2.0.0", "2.0.0").version == "2.0.0"

    def test_missing_version(self, base_layout: Path) -> None:
        """An exact version the layout does not hold lists what it holds."""
        with pytest.raises(ImageError, match=r"has no tag 9\.9\.9 \(available: 1\.0\.0"):
            resolve_base(f"oci:{base_layout}", "9.9.9")

    def test_image_index_is_narrowed_to_the_platform(self, tmp_path: Path) -> None:
        """A multi-platform base resolves to its linux/amd64 manifest; a missing one is named."""
        layout = tmp_path / "multi"
        amd64 = make_base_layout(layout, tags=[])
        manifest_size = len(synthetic_base_blobs()[0])
        index = canonical_json(
            {
                "schemaVersion": 2,
                "mediaType": OCI_INDEX,
                "manifests": [
                    {
                        "mediaType": OCI_MANIFEST,
                        "digest": "sha256:" + "0" * 64,
                        "size": 1,
                        "platform": {"os": "linux", "architecture": "arm64", "variant": "v8"},
                    },
                    {
                        "mediaType": DOCKER_MANIFEST,
                        "digest": amd64,
                        "size": manifest_size,
                        "platform": {"os": "linux", "architecture": "amd64"},
                    },
                ],
            }
        )
        (layout / "blobs" / "sha256" / sha256_digest(index)[7:]).write_bytes(index)
        write_layout_index(
            layout, Descriptor(OCI_INDEX, sha256_digest(index), len(index)), ["1.0.0"]
        )
        assert resolve_base(f"oci:{layout}", "1.0.0").digest == amd64
        with pytest.raises(
            ImageError, match=r"no image for linux/s390x \(offers: linux/arm64/v8, linux/amd64\)"
        ):
            resolve_base(f"oci:{layout}", "1.0.0", platform="linux/s390x")

    def test_not_a_layout(self, tmp_path: Path) -> None:
        """A directory that is not an image layout says so."""
        with pytest.raises(ImageError, match="is not an OCI image layout"):
            resolve_base(f"oci:{tmp_path}", "1.0.0")


# -- layers --------------------------------------------------------------------------------------


def _layer_blob(image: AssembledImage, name: str) -> bytes:
    layer = next(x for x in image.layers if x.name == name)
    return image.store.path(layer.descriptor.digest).read_bytes()


class TestLayers:
    def test_tar_headers_are_fixed(
        self, base: BaseImage, files: dict[str, Path], store: BlobStore
    ) -> None:
        """Entries sorted, parents explicit (0755), root-owned, no names, fixed mtime, no xattrs."""
        image = build(base, files, store)
        members = tar_members(_layer_blob(image, "mitosis"))
        assert [m.name for m in members] == [
            "app",
            "app/models",
            "app/models/mitosis",
            "app/models/mitosis/model.onnx",
            "app/models/mitosis/sub",
            "app/models/mitosis/sub/extra.txt",
        ]
        for member in members:
            assert (member.uid, member.gid, member.uname, member.gname) == (0, 0, "", "")
            assert member.mtime == CONTENT_MTIME != SDE
            assert member.pax_headers == {}
            assert member.mode == (0o755 if member.isdir() else member.mode)
        modes = {m.name: m.mode for m in members if m.isfile()}
        assert modes == {
            "app/models/mitosis/model.onnx": 0o644,
            "app/models/mitosis/sub/extra.txt": 0o600,
        }
        config_tar = tar_members(_layer_blob(image, "config"))
        assert {m.name: m.mode for m in config_tar}["app/config/run.sh"] == 0o755
        assert {m.mtime for m in config_tar} == {SDE}  # only the config layer carries the commit

    def test_content_round_trips(
        self, base: BaseImage, files: dict[str, Path], store: BlobStore
    ) -> None:
        """File bytes in the layer are the source bytes."""
        image = build(base, files, store)
        data = _layer_blob(image, "carcinoma")
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            extracted = tar.extractfile("app/models/carcinoma/model.onnx")
            assert extracted is not None
            assert extracted.read() == files["carcinoma/model.onnx"].read_bytes()

    def test_compression_rule(
        self, base: BaseImage, files: dict[str, Path], store: BlobStore
    ) -> None:
        """Incompressible weights stay plain tar; compressible and small layers are gzipped."""
        image = build(base, files, store)
        types = {x.name: x.descriptor.media_type for x in image.new_layers}
        assert types == {
            "carcinoma": OCI_LAYER,
            "mitosis": OCI_LAYER_GZIP,
            "config": OCI_LAYER_GZIP,
        }
        plain = next(x for x in image.layers if x.name == "carcinoma")
        assert plain.diff_id == plain.descriptor.digest  # DiffID of a plain tar is its digest
        assert 0 < COMPRESS_RATIO < 1

    def test_forced_compression(
        self, base: BaseImage, files: dict[str, Path], store: BlobStore
    ) -> None:
        """LayerSpec.compress overrides the rule."""
        spec = LayerSpec("c", [FileEntry("/app/models/c/x", b"x" * 100)], compress=False)
        image = assemble(
            base, [spec], labels={}, annotations={}, source_date_epoch=SDE, store=store
        )
        assert image.new_layers[0].descriptor.media_type == OCI_LAYER

    def test_gzip_header_has_no_name_and_no_time(
        self, base: BaseImage, files: dict[str, Path], store: BlobStore
    ) -> None:
        """gzip member header: magic, deflate, no flags (no FNAME), MTIME 0, XFL 0, OS 255."""
        image = build(base, files, store)
        head = _layer_blob(image, "config")[:10]
        assert head == b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff"

    def test_diff_id_is_sha256_of_uncompressed(
        self, base: BaseImage, files: dict[str, Path], store: BlobStore
    ) -> None:
        """Config DiffIDs are the digests of the decompressed layer tars."""
        image = build(base, files, store)
        config = json.loads(image.config_bytes)
        for layer in image.new_layers:
            data = store.path(layer.descriptor.digest).read_bytes()
            raw = gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data
            assert layer.diff_id == sha256_digest(raw)
            assert layer.descriptor.digest == sha256_digest(data)
            assert layer.descriptor.size == len(data)
        assert config["rootfs"]["diff_ids"][-3:] == [x.diff_id for x in image.new_layers]

    @pytest.mark.parametrize(
        ("entries", "message"),
        [
            ([FileEntry("app/x", b"")], "not an absolute in-image path"),
            ([FileEntry("/app/../etc/x", b"")], "not an absolute in-image path"),
            ([FileEntry("/app/x", b"1"), FileEntry("/app/x", b"2")], "listed twice"),
            (
                [FileEntry("/app/x", b"1"), FileEntry("/app/x/y", b"2")],
                "both a file and a directory",
            ),
            ([], "has no files"),
        ],
    )
    def test_bad_entries(
        self, base: BaseImage, store: BlobStore, entries: list[FileEntry], message: str
    ) -> None:
        """Bad in-image paths are refused with the layer named."""
        with pytest.raises(ImageError, match=message):
            assemble(
                base,
                [LayerSpec("bad", entries)],
                labels={},
                annotations={},
                source_date_epoch=SDE,
                store=store,
            )

    def test_long_and_unicode_paths_are_deterministic(
        self, base: BaseImage, tmp_path: Path
    ) -> None:
        """Paths that need PAX records give identical bytes in two fresh stores."""
        name = "/app/models/ü/" + "d" * 120 + "/weights.bin"
        spec = [LayerSpec("u", [FileEntry(name, b"1234")])]
        digests = {
            assemble(
                base,
                spec,
                labels={},
                annotations={},
                source_date_epoch=SDE,
                store=BlobStore(tmp_path / str(i)),
            ).manifest_digest
            for i in range(2)
        }
        assert len(digests) == 1


# -- config and manifest -------------------------------------------------------------------------


class TestConfigAndManifest:
    def test_config_inherits_the_base_and_adds_ours(
        self, base: BaseImage, files: dict[str, Path], store: BlobStore
    ) -> None:
        """Runtime settings and labels are inherited; build-host fields are dropped."""
        image = build(base, files, store)
        config = json.loads(image.config_bytes)
        runtime = config["config"]
        assert runtime["Env"] == ["PATH=/usr/bin:/bin", "LANG=C.UTF-8"]
        assert runtime["Cmd"] == ["python3"]
        assert runtime["WorkingDir"] == "/srv" and runtime["User"] == "1000:1000"
        assert runtime["ExposedPorts"] == {"8080/tcp": {}} and runtime["StopSignal"] == "SIGTERM"
        assert runtime["Labels"]["com.ivd.runner.config-schemas"] == "1,2"
        assert runtime["Labels"]["com.ivd.customer"] == "customer-x"
        assert runtime["Labels"]["org.opencontainers.image.base.digest"] == base.digest
        assert "build-host-must-not-leak" not in image.config_bytes.decode()
        assert config["created"] == rfc3339(SDE) == "2023-11-14T22:13:20Z"
        new_history = config["history"][1:]
        assert [h["created"] for h in new_history] == [rfc3339(SDE)] * 3
        assert [h["created_by"] for h in new_history] == [
            "ivd-image-builder: COPY carcinoma /app/models/carcinoma",
            "ivd-image-builder: COPY mitosis /app/models/mitosis",
            "ivd-image-builder: COPY config /app/config",
        ]
        assert config["rootfs"]["diff_ids"][0] == base.diff_ids[0]
        assert image.config_bytes == canonical_json(config)

    def test_manifest_keeps_base_layers_and_annotates(
        self, base: BaseImage, files: dict[str, Path], store: BlobStore
    ) -> None:
        """OCI manifest; base layer descriptors kept (Docker media type); base.* annotations."""
        image = build(base, files, store)
        manifest = json.loads(image.manifest_bytes)
        assert manifest["mediaType"] == OCI_MANIFEST and manifest["schemaVersion"] == 2
        assert manifest["config"]["mediaType"] == OCI_CONFIG
        assert manifest["layers"][0] == base.manifest["layers"][0]
        assert [x["annotations"]["com.ivd.layer.name"] for x in manifest["layers"][1:]] == [
            "carcinoma",
            "mitosis",
            "config",
        ]
        assert manifest["annotations"] == {
            "org.opencontainers.image.base.digest": base.digest,
            "org.opencontainers.image.created": "2023-11-14T22:13:20Z",
            "org.opencontainers.image.source": "https://git.example/customers.git",
        }
        old = json.loads(build(base, files, store, layer_format=2).manifest_bytes)
        assert old["annotations"]["org.opencontainers.image.base.name"] == "bases:1.1.0"
        assert image.manifest_bytes == canonical_json(manifest)
        assert image.manifest_digest == sha256_digest(image.manifest_bytes)
        assert [x.new for x in image.layers] == [False, True, True, True]

    def test_labels_change_the_digest(
        self, base: BaseImage, files: dict[str, Path], store: BlobStore
    ) -> None:
        """Different labels, different image; same layers reused."""
        one = build(base, files, store)
        two = assemble(
            base,
            layer_specs(files),
            labels={**LABELS, "com.ivd.customer": "customer-y"},
            annotations=ANNOTATIONS,
            source_date_epoch=SDE,
            store=store,
        )
        assert one.manifest_digest != two.manifest_digest
        assert [x.descriptor for x in one.layers] == [x.descriptor for x in two.layers]


# -- layer identity ------------------------------------------------------------------------------


def _customer(
    base: BaseImage, files: dict[str, Path], store: BlobStore, sde: int, name: str, **kw: Any
) -> AssembledImage:
    """One customer's image: the shared models, its own config and commit time."""
    specs = layer_specs(files, with_sha=kw.pop("with_sha", False))
    specs[-1] = LayerSpec(
        "config", [FileEntry("/app/config/analysis.yaml", name.encode())], stamped=True
    )
    return assemble(
        base,
        specs,
        labels={"com.ivd.customer": name},
        annotations={},
        source_date_epoch=sde,
        store=store,
        **kw,
    )


def _layer_digests(image: AssembledImage) -> dict[str | None, str]:
    return {x.name: x.descriptor.digest for x in image.new_layers}


class TestLayerIdentity:
    def test_model_layers_do_not_depend_on_commit_time_or_customer(
        self, base: BaseImage, files: dict[str, Path], tmp_path: Path
    ) -> None:
        """Two customers, other commit times, fresh stores: same model blobs, other configs."""
        x = _customer(base, files, BlobStore(tmp_path / "x"), SDE, "customer-x")
        y = _customer(base, files, BlobStore(tmp_path / "y"), SDE + 86_400 * 400, "customer-y")
        dx, dy = _layer_digests(x), _layer_digests(y)
        assert dx["carcinoma"] == dy["carcinoma"] and dx["mitosis"] == dy["mitosis"]
        assert dx["config"] != dy["config"]
        assert x.manifest_digest != y.manifest_digest
        assert json.loads(y.config_bytes)["created"] == rfc3339(SDE + 86_400 * 400)

    def test_config_commit_alone_changes_config_layer_and_image(
        self, base: BaseImage, files: dict[str, Path], store: BlobStore
    ) -> None:
        """Same config bytes, later commit: only the config layer and the image config change."""
        one = _customer(base, files, store, SDE, "customer-x", with_sha=True)
        two = _customer(base, files, store, SDE + 60, "customer-x", with_sha=True)
        changed = {k for k, v in _layer_digests(one).items() if _layer_digests(two)[k] != v}
        assert changed == {"config"}
        assert one.config_digest != two.config_digest
        assert {x.name: x.reused for x in two.new_layers} == {
            "carcinoma": True,
            "mitosis": True,
            "config": False,
        }

    def test_format_is_recorded_and_format_1_stamps_every_layer(
        self, base: BaseImage, files: dict[str, Path], store: BlobStore
    ) -> None:
        """The label names the rule; format 1 (older images) stamps all layers, has no label."""
        new = build(base, files, store, labels={**LABELS, LAYER_FORMAT_LABEL: "7"})
        assert new.new_layers and LAYER_FORMAT == 3
        labels = json.loads(new.config_bytes)["config"]["Labels"]
        assert labels[LAYER_FORMAT_LABEL] == "3"  # what the image is, not what was claimed
        two = build(base, files, store, layer_format=2)
        assert json.loads(two.config_bytes)["config"]["Labels"][LAYER_FORMAT_LABEL] == "2"
        assert _layer_digests(two) == _layer_digests(new)  # format 3 changed no layer rule
        old = build(base, files, store, layer_format=1)
        assert LAYER_FORMAT_LABEL not in json.loads(old.config_bytes)["config"]["Labels"]
        for layer in old.new_layers:
            assert {m.mtime for m in tar_members(_layer_blob(old, str(layer.name)))} == {SDE}
        assert _layer_digests(old)["carcinoma"] != _layer_digests(new)["carcinoma"]
        assert _layer_digests(old)["config"] == _layer_digests(new)["config"]

    def test_unknown_format_is_refused(
        self, base: BaseImage, files: dict[str, Path], store: BlobStore
    ) -> None:
        """A layer format this builder cannot write: one clear error, nothing built."""
        with pytest.raises(ImageError, match="layer format 4 is not one this builder writes"):
            build(base, files, store, layer_format=4)
        assert not any(store.blobs.iterdir())

    def test_format_3_names_no_location(
        self, base: BaseImage, files: dict[str, Path], store: BlobStore
    ) -> None:
        """From format 3 the base's name (a registry alias) is not recorded, and the base's own
        location labels are not inherited (they describe the base); format 2 records the name."""
        located = {
            **base.config,
            "config": {
                **base.config["config"],
                "Labels": {
                    **base.labels,
                    "org.opencontainers.image.source": "https://git.example/base.git",
                    "org.opencontainers.image.base.name": "docker.io/library/debian:12",
                },
            },
        }
        labelled = dataclasses.replace(base, config=located)
        for spelled in ("127.0.0.1:5000/ivd/base:1.1.0", "localhost:5000/ivd/base:1.1.0"):
            image = build(dataclasses.replace(labelled, name=spelled), files, store, labels={})
            labels = json.loads(image.config_bytes)["config"]["Labels"]
            assert not {"org.opencontainers.image.source", BASE_NAME_LABEL} & set(labels)
            assert BASE_NAME_LABEL not in json.loads(image.manifest_bytes)["annotations"]
            assert labels["org.example.base"] == "yes"  # other base labels are inherited
        aliases = {
            build(dataclasses.replace(labelled, name=n), files, store, labels={}).manifest_digest
            for n in ("127.0.0.1:5000/ivd/base:1.1.0", "localhost:5000/ivd/base:1.1.0")
        }
        assert len(aliases) == 1
        old = build(dataclasses.replace(labelled, name="h:1/b:1.1.0"), files, store, layer_format=2)
        assert json.loads(old.config_bytes)["config"]["Labels"][BASE_NAME_LABEL] == "h:1/b:1.1.0"


# -- determinism ---------------------------------------------------------------------------------

_CHILD = """
import json, os, sys, time
from pathlib import Path
sys.path.insert(0, {root!r})
sys.path.insert(0, {tests!r})
os.environ["TZ"] = "Pacific/Chatham"
time.tzset()
from builder.image.base import resolve_base
from builder.oci import BlobStore
import test_assemble as t
files = {{k: Path(v) for k, v in json.loads(sys.argv[1]).items()}}
image = t.build(resolve_base("oci:" + sys.argv[2], "~=1.0"), files, BlobStore(sys.argv[3]))
print(json.dumps({{"manifest": image.manifest_digest,
                  "layers": [x.descriptor.digest for x in image.layers]}}))
"""


class TestDeterminism:
    def test_same_inputs_same_digest_across_processes(
        self, base: BaseImage, base_layout: Path, files: dict[str, Path], tmp_path: Path
    ) -> None:
        """Other umask, TZ, cwd, source mtimes/modes, creation order, fresh store: same digest."""
        here = build(base, files, BlobStore(tmp_path / "store-a"))
        # The same bytes, created in reverse order, with other mtimes and on-disk modes.
        other_dir = tmp_path / "elsewhere"
        other_dir.mkdir()
        other: dict[str, str] = {}
        for i, (rel, path) in enumerate(sorted(files.items(), reverse=True)):
            copy = other_dir / f"{i}-{path.name}"
            copy.write_bytes(path.read_bytes())
            copy.chmod(0o600 if i % 2 else 0o777)
            os.utime(copy, (1_000_000 + i * 7777, 2_000_000 + i * 9999))
            other[rel] = str(copy)
        cwd = tmp_path / "cwd"
        cwd.mkdir()
        child = _CHILD.format(root=str(ROOT), tests=str(ROOT / "tests"))
        done = subprocess.run(
            [
                sys.executable,
                "-c",
                child,
                json.dumps(other),
                str(base_layout),
                str(tmp_path / "store-b"),
            ],
            capture_output=True,
            text=True,
            cwd=cwd,
            timeout=120,
            check=False,
            preexec_fn=lambda: os.umask(0o077),
            env={**os.environ, "TZ": "Asia/Kolkata", "LC_ALL": "C"},
        )
        assert done.returncode == 0, done.stderr
        there = json.loads(done.stdout)
        assert there["manifest"] == here.manifest_digest
        assert there["layers"] == [x.descriptor.digest for x in here.layers]
        for digest in there["layers"][1:]:
            assert (tmp_path / "store-b").joinpath(
                "blobs/sha256", digest[7:]
            ).read_bytes() == here.store.path(digest).read_bytes()

    def test_cache_state_does_not_matter(
        self, base: BaseImage, files: dict[str, Path], tmp_path: Path
    ) -> None:
        """A warm layer cache gives the same digest as a cold one, without re-tarring."""
        store = BlobStore(tmp_path / "store")
        cold = build(base, files, store, with_sha=True)
        warm = build(base, files, store, with_sha=True)
        assert warm.manifest_digest == cold.manifest_digest
        assert all(x.reused for x in warm.new_layers)
        assert not any(x.reused for x in cold.new_layers)
        fresh = build(base, files, BlobStore(tmp_path / "fresh"), with_sha=False)
        assert fresh.manifest_digest == cold.manifest_digest

    def test_changed_weights_change_only_their_layer(
        self, base: BaseImage, files: dict[str, Path], store: BlobStore
    ) -> None:
        """Touching one model rebuilds that layer only; the others come from the cache."""
        first = build(base, files, store, with_sha=True)
        files["mitosis/model.onnx"].write_bytes(b"new weights" * 1000)
        second = build(base, files, store, with_sha=True)
        reused = {x.name: x.reused for x in second.new_layers}
        assert reused == {"carcinoma": True, "mitosis": False, "config": True}
        assert first.manifest_digest != second.manifest_digest


# -- the blob store ------------------------------------------------------------------------------


class TestBlobStore:
    def test_is_an_oci_layout(self, store: BlobStore) -> None:
        """The store root carries oci-layout and blobs/sha256/<hex>."""
        digest = store.put_bytes(b"hello")
        assert json.loads((store.root / "oci-layout").read_text()) == {
            "imageLayoutVersion": "1.0.0"
        }
        assert (
            store.path(digest)
            == store.root / "blobs" / "sha256" / hashlib.sha256(b"hello").hexdigest()
        )
        assert store.read_bytes(digest) == b"hello"

    def test_ingest_refuses_wrong_content(self, store: BlobStore) -> None:
        """A download that does not match its digest never lands in the store."""
        with pytest.raises(ImageError, match="does not match its digest"):
            store.ingest([b"evil"], sha256_digest(b"good"))
        assert not store.has(sha256_digest(b"good"))
        assert not any(store.blobs.iterdir())
        assert not any((store.root / "tmp").iterdir())

    def test_disk_full_while_writing_a_layer(
        self,
        base: BaseImage,
        files: dict[str, Path],
        store: BlobStore,
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        """ENOSPC half-way through a layer: ImageError, no blob, no temp file left behind."""
        real_write = BlobWriter.write

        def failing_write(self: BlobWriter, data: bytes | bytearray | memoryview) -> int:
            if self.size + len(data) > (1 << 20):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return real_write(self, data)

        monkeypatch.setattr(BlobWriter, "write", failing_write)
        before = set(store.blobs.iterdir())
        with pytest.raises(ImageError, match="disk full while writing layer carcinoma") as info:
            build(base, files, store)
        assert info.value.hint and "nothing partial was kept" in info.value.hint
        assert set(store.blobs.iterdir()) == before
        assert not any((store.root / "tmp").iterdir())
        monkeypatch.setattr(BlobWriter, "write", real_write)
        image = build(base, files, store)  # and the next run works
        assert all(store.has(x.descriptor.digest) for x in image.new_layers)


# -- files out: OCI layout and docker archive ----------------------------------------------------


class TestLayoutAndArchive:
    def test_layout_readable_by_skopeo(
        self, base: BaseImage, files: dict[str, Path], store: BlobStore, tmp_path: Path
    ) -> None:
        """skopeo inspects the layout by tag and copies it with the digest preserved."""
        image = build(base, files, store)
        out = write_oci_layout(image, tmp_path / "out", ["1.1.0-abc", "latest"])
        info = json.loads(skopeo("inspect", f"oci:{out}:1.1.0-abc"))
        assert info["Digest"] == image.manifest_digest
        assert info["Labels"]["com.ivd.customer"] == "customer-x"
        assert len(info["Layers"]) == 4
        raw = skopeo("inspect", "--raw", f"oci:{out}:latest")
        assert raw.encode() == image.manifest_bytes
        skopeo("copy", "--preserve-digests", f"oci:{out}:latest", f"oci:{tmp_path / 'copy'}:latest")
        copied = json.loads(skopeo("inspect", f"oci:{tmp_path / 'copy'}:latest"))
        assert copied["Digest"] == image.manifest_digest
        skopeo("copy", f"oci:{out}:latest", f"dir:{tmp_path / 'dir'}")  # every blob is readable

    def test_layout_merges_and_repoints(
        self, base: BaseImage, files: dict[str, Path], store: BlobStore, tmp_path: Path
    ) -> None:
        """Writing into an existing layout keeps other tags and re-points a reused one."""
        one = build(base, files, store)
        two = assemble(
            base,
            layer_specs(files)[:1],
            labels={},
            annotations={},
            source_date_epoch=SDE,
            store=store,
        )
        out = tmp_path / "out"
        write_oci_layout(one, out, ["a", "shared"])
        write_oci_layout(two, out, ["b", "shared"])
        entries = {e.ref_name: e.descriptor.digest for e in read_layout_index(out)}
        assert entries == {
            "a": one.manifest_digest,
            "b": two.manifest_digest,
            "shared": two.manifest_digest,
        }
        index = json.loads((out / "index.json").read_text())
        assert all(REF_NAME in m["annotations"] for m in index["manifests"])
        assert json.loads(skopeo("inspect", f"oci:{out}:a"))["Digest"] == one.manifest_digest

    def test_docker_archive_layout(
        self, base: BaseImage, files: dict[str, Path], store: BlobStore, tmp_path: Path
    ) -> None:
        """manifest.json lists config and layers in order; the tar is also an OCI layout."""
        image = build(base, files, store)
        archive = tmp_path / "image.tar"
        write_docker_archive(image, archive, ["ivd/customer-x:1.1.0-abc"])
        with tarfile.open(archive) as tar:
            names = tar.getnames()
            manifest_file = tar.extractfile("manifest.json")
            assert manifest_file is not None
            manifest = json.load(manifest_file)
        assert manifest == [
            {
                "Config": f"blobs/sha256/{image.config_digest[7:]}",
                "RepoTags": ["ivd/customer-x:1.1.0-abc"],
                "Layers": [f"blobs/sha256/{x.descriptor.digest[7:]}" for x in image.layers],
            }
        ]
        assert {"oci-layout", "index.json", f"blobs/sha256/{image.manifest_digest[7:]}"} <= set(
            names
        )
        info = json.loads(skopeo("inspect", f"docker-archive:{archive}"))
        assert info["Labels"]["com.ivd.customer"] == "customer-x"
        again = tmp_path / "again.tar"
        write_docker_archive(image, again, ["ivd/customer-x:1.1.0-abc"])
        assert again.read_bytes() == archive.read_bytes()

    def test_docker_archive_needs_name_and_tag(
        self, base: BaseImage, files: dict[str, Path], store: BlobStore, tmp_path: Path
    ) -> None:
        """A RepoTag without a tag is refused before anything is written."""
        image = build(base, files, store)
        with pytest.raises(ImageError, match="must be name:tag"):
            write_docker_archive(image, tmp_path / "x.tar", ["ivd/customer-x"])
        assert not (tmp_path / "x.tar").exists()
