"""Resolve and deliver against the test bed: a real registry, a real Docker engine, skopeo.

Faults are injected only where a real component cannot be made to fail on cue: a small HTTP
proxy in front of the registry answers 503 to chosen requests, and the blob writer is made to
hit ENOSPC (in test_assemble).
"""

from __future__ import annotations

import base64
import http.client
import json
import secrets
import subprocess
import threading
import urllib.request
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from test_assemble import LABELS, SDE, layer_specs, model_tree

from builder.deliver import (
    load_into_docker,
    push,
    write_docker_archive,
    write_oci_layout,
)
from builder.errors import ImageError
from builder.image.assemble import AssembledImage, FileEntry, LayerSpec, assemble
from builder.image.base import BaseImage, resolve_base
from builder.image.store import ImageStore
from builder.oci import DOCKER_MANIFEST, BlobStore, RegistryClient, RetryPolicy
from testbed._util import free_port
from testbed.docker_engine import Engine
from testbed.registry import Registry, start_registry

FAST = RetryPolicy(attempts=3, backoff=0.05, max_backoff=0.2, connect_timeout=5, read_timeout=60)
BASE_REPO = "ivd/inference-base"
BASE_VERSIONS = ("2.4.0", "2.4.1", "2.5.0rc1", "latest")

pytestmark = pytest.mark.docker


# -- test bed (session fixtures from conftest: docker_engine, oci_registry, base_os_image) -----


@pytest.fixture(scope="module")
def registry(oci_registry: Registry) -> Registry:
    return oci_registry


@pytest.fixture(scope="module")
def docker_client(docker_engine: Engine) -> Iterator[Any]:
    client = docker_engine.client()
    yield client
    client.close()


def docker_push(client: Any, source: str, target_repo: str, tag: str, auth: Any = None) -> str:
    """Push a local image with the docker SDK; return the manifest digest."""
    client.images.get(source).tag(target_repo, tag)
    digest = ""
    for event in client.api.push(target_repo, tag=tag, stream=True, decode=True, auth_config=auth):
        assert "error" not in event, event
        digest = (event.get("aux") or {}).get("Digest", digest)
    assert digest
    return str(digest)


@pytest.fixture(scope="module")
def pushed_base(registry: Registry, docker_client: Any, base_os_image: str) -> dict[str, str]:
    """The test bed's base OS image in the registry under a few versions; tag -> digest."""
    return {
        version: docker_push(docker_client, base_os_image, f"{registry.host}/{BASE_REPO}", version)
        for version in BASE_VERSIONS
    }


@pytest.fixture(scope="module")
def base(registry: Registry, pushed_base: dict[str, str]) -> BaseImage:
    return resolve_base(f"{registry.host}/{BASE_REPO}", "~=2.4", retry=FAST)


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return model_tree(tmp_path_factory.mktemp("weights"))


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> BlobStore:
    return BlobStore(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def image(base: BaseImage, weights: dict[str, Path], store: BlobStore) -> AssembledImage:
    return assemble(
        base,
        layer_specs(weights),
        labels=LABELS,
        annotations={},
        source_date_epoch=SDE,
        store=store,
    )


def variant(base: BaseImage, store: BlobStore, marker: str) -> AssembledImage:
    """A small, different image on the same base (for tag-overwrite tests)."""
    spec = LayerSpec("config", [FileEntry("/app/config/marker.txt", marker.encode())])
    return assemble(
        base, [spec], labels={"m": marker}, annotations={}, source_date_epoch=SDE, store=store
    )


def repo(registry: Registry, name: str) -> str:
    """A fresh repository in the registry, unique per test."""
    return f"{registry.host}/test-{secrets.token_hex(4)}/{name}"


# -- resolving the base in a registry ------------------------------------------------------------


class TestResolveRegistry:
    def test_exact_version(self, registry: Registry, pushed_base: dict[str, str]) -> None:
        """An exact version resolves to its tag and the digest the registry holds."""
        base = resolve_base(f"{registry.host}/{BASE_REPO}", "2.4.0", retry=FAST)
        assert (base.version, base.digest) == ("2.4.0", pushed_base["2.4.0"])
        assert base.source == "registry" and base.registry == registry.host
        assert base.manifest["mediaType"] == DOCKER_MANIFEST
        assert base.name == f"{registry.host}/{BASE_REPO}:2.4.0"

    def test_constraint_and_labels(self, base: BaseImage, pushed_base: dict[str, str]) -> None:
        """~=2.4 picks 2.4.1 (not the prerelease); the base's labels are readable."""
        assert base.version == "2.4.1"
        assert base.digest == pushed_base["2.4.1"]
        assert "com.ivd.base-os.recipe" in base.labels
        assert base.config["config"]["Cmd"] == ["python3"]

    def test_missing_tag(self, registry: Registry, pushed_base: dict[str, str]) -> None:
        """A version that is not there lists the versions that are."""
        with pytest.raises(ImageError) as info:
            resolve_base(f"{registry.host}/{BASE_REPO}", "2.4.7", retry=FAST)
        assert str(info.value) == (
            f"base image {registry.host}/{BASE_REPO} has no tag 2.4.7 "
            "(available: 2.4.0, 2.4.1, 2.5.0rc1)"
        )

    def test_no_version_satisfies(self, registry: Registry, pushed_base: dict[str, str]) -> None:
        """An unsatisfiable constraint says so and lists what exists."""
        with pytest.raises(ImageError, match=r"no version .* satisfies '>=3'.*available: 2\.4\.0"):
            resolve_base(f"{registry.host}/{BASE_REPO}", ">=3", retry=FAST)

    def test_unknown_repository(self, registry: Registry) -> None:
        """A repository the registry does not know is named."""
        with pytest.raises(
            ImageError, match=f"registry {registry.host} has no repository nope/base"
        ):
            resolve_base(f"{registry.host}/nope/base", "1.0.0", retry=FAST)

    def test_unreachable_registry(self) -> None:
        """Nothing listening: a refused connection is an answer (two tries, no backoff), one
        clear line; the next client within a minute is told at once, without asking."""
        host = f"127.0.0.1:{free_port()}"
        with pytest.raises(ImageError) as info:
            resolve_base(f"{host}/ivd/base", "1.0.0", retry=FAST)
        assert (
            str(info.value)
            == f"cannot reach registry {host}: connection refused (GET /v2/, 2 attempts)"
        )
        with pytest.raises(ImageError, match=r"connection refused \d+ s ago \(GET /v2/; asked"):
            resolve_base(f"{host}/ivd/base", "1.0.0", retry=FAST)

    def test_a_silent_registry_is_remembered_across_commands(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, registry: Registry
    ) -> None:
        """A registry that accepts connections but never answers costs one short timeout
        (twice), and the answer is kept for a minute for the next commands too (a file in the
        user cache); a registry that answers is asked as usual."""
        import socket

        from builder.oci import remote

        monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
        silent = socket.socket()
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)  # the kernel completes the handshake; nobody ever reads or writes
        host = f"127.0.0.1:{silent.getsockname()[1]}"
        quick = RetryPolicy(attempts=4, backoff=0.05, read_timeout=0.5)
        try:
            with pytest.raises(ImageError, match="timed out \\(GET /v2/, 2 attempts\\)"):
                resolve_base(f"{host}/ivd/base", "1.0.0", retry=quick)
            remote._UNREACHABLE._seen.clear()  # a new command: only the file is left
            with pytest.raises(ImageError, match=r"timed out \d+ s ago \(GET /v2/; asked again"):
                resolve_base(f"{host}/ivd/base", "1.0.0", retry=quick)
        finally:
            silent.close()
        assert (tmp_path / "xdg" / "ivd-builder" / "unreachable-registries").is_dir()
        assert RegistryClient(registry.host, retry=FAST).host == registry.host  # still asked


# -- push ----------------------------------------------------------------------------------------


def run_in_image(client: Any, ref: str, script: str) -> str:
    """Run ``sh -c script`` in ``ref`` (host network: the test bed has no bridge)."""
    out = client.containers.run(ref, ["sh", "-c", script], network_mode="host", remove=True)
    return bytes(out).decode()


def expected_listing(weights: dict[str, Path]) -> str:
    """What `sha256sum` over /app prints for the test inputs."""
    import hashlib

    lines = []
    for spec in layer_specs(weights):
        for entry in spec.entries:
            data = entry.source if isinstance(entry.source, bytes) else entry.source.read_bytes()
            lines.append(f"{hashlib.sha256(data).hexdigest()}  .{entry.path.removeprefix('/app')}")
    return "\n".join(sorted(lines, key=lambda line: line.split("  ", 1)[1])) + "\n"


class TestPush:
    def test_push_pull_run(
        self,
        registry: Registry,
        image: AssembledImage,
        docker_client: Any,
        weights: dict[str, Path],
    ) -> None:
        """Push mounts the base, uploads ours; docker pulls and runs it; files are right."""
        target = repo(registry, "customer-x")
        progress: list[tuple[str, int, int]] = []
        report = push(
            image,
            [f"{target}:2.4.1-abc", f"{target}:latest"],
            immutable=["2.4.1-abc"],
            force=False,
            insecure=None,
            retry=FAST,
            progress=lambda e: progress.append((e.what, e.done, e.total)),
        )
        assert report.manifest_digest == image.manifest_digest
        assert report.refs == (f"{target}:2.4.1-abc", f"{target}:latest")
        actions = [(b.digest, b.action) for b in report.blobs]
        base_layers = [x.descriptor.digest for x in image.layers if not x.new]
        assert [a for d, a in actions if d in base_layers] == ["mounted"] * len(base_layers)
        assert [a for d, a in actions if d not in base_layers] == ["uploaded"] * 4
        assert report.bytes_uploaded == sum(x.descriptor.size for x in image.new_layers) + len(
            image.config_bytes
        )
        assert progress and progress[-1][1] == progress[-1][2]

        info = json.loads(
            subprocess.run(
                ["skopeo", "inspect", "--tls-verify=false", f"docker://{target}:2.4.1-abc"],
                capture_output=True,
                text=True,
                check=True,
                timeout=60,
            ).stdout
        )
        assert info["Digest"] == image.manifest_digest
        assert info["Labels"]["com.ivd.customer"] == "customer-x"

        pulled = docker_client.images.pull(target, tag="2.4.1-abc")
        try:
            assert pulled.id == image.image_id
            listing = run_in_image(
                docker_client,
                pulled.id,
                "cd /app && find . -type f -exec sha256sum {} + | sort -k2",
            )
            assert listing == expected_listing(weights)
            modes = run_in_image(
                docker_client, pulled.id, "stat -c '%a %u %g %n' /app/config/run.sh /app"
            )
            assert modes.splitlines() == ["755 0 0 /app/config/run.sh", "755 0 0 /app"]
        finally:
            docker_client.images.remove(f"{target}:2.4.1-abc", force=True)

    def test_second_push_uploads_nothing(self, registry: Registry, image: AssembledImage) -> None:
        """Pushing again finds every blob present: zero uploads, only the manifest PUTs."""
        target = repo(registry, "customer-x")
        push(image, [f"{target}:1"], retry=FAST)
        mark = len(registry.requests())
        again = push(image, [f"{target}:1", f"{target}:2"], retry=FAST)
        assert again.count("uploaded") == 0 and again.bytes_uploaded == 0
        assert again.count("present") == len(image.layers) + 1
        assert registry.blob_uploads(since=mark) == []

    def test_immutable_tag_refused_then_forced(
        self, registry: Registry, base: BaseImage, store: BlobStore
    ) -> None:
        """An immutable tag on another digest is refused (nothing sent); force overwrites loudly."""
        target = repo(registry, "customer-y")
        first, second = variant(base, store, "one"), variant(base, store, "two")
        push(first, [f"{target}:2.4.1-abc"], immutable=["2.4.1-abc"], retry=FAST)
        mark = len(registry.requests())
        with pytest.raises(ImageError) as info:
            push(
                second,
                [f"{target}:2.4.1-abc", f"{target}:latest"],
                immutable=["2.4.1-abc"],
                retry=FAST,
            )
        message = str(info.value)
        assert "immutable tag" in message and first.manifest_digest in message
        assert "What differs: label m: one (tagged) vs two (this build)" in message
        assert "--force" in message
        client = RegistryClient(registry.host, retry=FAST)
        path = target.split("/", 1)[1]
        assert client.manifest_digest(path, "2.4.1-abc") == first.manifest_digest
        assert client.manifest_digest(path, "latest") is None
        assert registry.blob_uploads(since=mark) == []
        assert registry.manifest_puts(since=mark) == []

        report = push(
            second,
            [f"{target}:2.4.1-abc"],
            immutable=[f"{target}:2.4.1-abc"],
            force=True,
            retry=FAST,
        )
        assert report.overwritten == {f"{target}:2.4.1-abc": first.manifest_digest}
        assert (
            report.warnings
            and "FORCED" in report.warnings[0]
            and first.manifest_digest in report.warnings[0]
            and "label m: one (tagged) vs two (this build)" in report.warnings[0]
        )
        assert client.manifest_digest(path, "2.4.1-abc") == second.manifest_digest

    def test_moving_tag_is_repointed_without_asking(
        self, registry: Registry, base: BaseImage, store: BlobStore
    ) -> None:
        """A moving tag is re-pointed without force and without being read first."""
        target = repo(registry, "customer-z")
        first, second = variant(base, store, "a"), variant(base, store, "b")
        push(first, [f"{target}:latest"], retry=FAST)
        mark = len(registry.requests())
        report = push(second, [f"{target}:latest"], immutable=["2.4.1-x"], retry=FAST)
        assert report.overwritten == {}
        path = target.split("/", 1)[1]
        assert ("HEAD", f"/v2/{path}/manifests/latest") not in {
            (r.method, r.path) for r in registry.requests()[mark:]
        }
        client = RegistryClient(registry.host, retry=FAST)
        assert client.manifest_digest(path, "latest") == second.manifest_digest

    def test_a_restack_sends_only_what_changed_in_six_requests(
        self, registry: Registry, base: BaseImage, weights: dict[str, Path], store: BlobStore
    ) -> None:
        """A config-only change (new config layer and image config) pushed to its immutable
        and moving tag: the blobs the layer cache knows are not asked about, so the push is
        the two small uploads (POST + PUT each) and the two tags. A base bump is one fewer
        upload. The immutable tag's check, when the caller made it earlier (a fleet reads
        every tag in one batch), is not made again; otherwise it is one HEAD more."""
        target = repo(registry, "customer-r")

        def build(marker: str, on: BaseImage) -> AssembledImage:
            layers = [
                *layer_specs(weights)[:-1],
                LayerSpec(
                    "config", [FileEntry("/app/config/marker.txt", marker.encode())], stamped=True
                ),
            ]
            return assemble(
                on, layers, labels=LABELS, annotations={}, source_date_epoch=SDE, store=store
            )

        def tags(rev: str) -> list[str]:  # the immutable tag and the moving one
            return [f"{target}:2.4.1-{rev}", f"{target}:2.4.1"]

        push(build("v1", base), tags("v1"), immutable=["2.4.1-v1"], retry=FAST)
        changed = build("v2", base)
        mark = len(registry.requests())
        known = {f"{target}:2.4.1-v2": None}
        report = push(changed, tags("v2"), immutable=["2.4.1-v2"], known=known, retry=FAST)
        sent = [
            (r.method, r.path.split("?")[0]) for r in registry.requests()[mark:] if r.path != "/v2/"
        ]
        assert len(sent) == 6, sent
        assert [m for m, _ in sent].count("PUT") == 4  # two blobs, two tags
        assert report.count("uploaded") == 2 and report.manifests_sent == 2
        mark = len(registry.requests())
        push(changed, [f"{target}:2.4.1-v3"], immutable=["2.4.1-v3"], retry=FAST)
        again = [r for r in registry.requests()[mark:] if r.path != "/v2/"]
        assert [(r.method, r.path.rsplit("/", 1)[1]) for r in again] == [
            ("HEAD", "2.4.1-v3"),  # the immutable tag's own check
            ("PUT", "2.4.1-v3"),
        ]

    def test_the_stores_copy_of_a_registry_base_mounts_its_layers(
        self, registry: Registry, base: BaseImage, tmp_path: Path
    ) -> None:
        """A build on the local store's copy of a registry base (what a fleet run's builds
        use) mounts the base layers from the base repository, never uploads them."""
        images = ImageStore(tmp_path / "store")
        images.keep_base(base)
        copy = images.find_digest(base.repository, base.version, base.digest)
        assert copy is not None and copy.source == "store"
        image = variant(copy, images.blobs, "from the store")
        report = push(image, [f"{repo(registry, 'customer-s')}:1"], retry=FAST)
        actions = {b.digest: b.action for b in report.blobs}
        assert {actions[layer.digest] for layer in base.layers} == {"mounted"}
        assert report.bytes_uploaded < 64 * 1024

    def test_a_wrong_layer_cache_costs_a_check_not_a_failure(
        self, registry: Registry, base: BaseImage, store: BlobStore
    ) -> None:
        """The layer cache believes a blob is in the repository, but it was deleted there:
        the registry refuses the manifest (MANIFEST_BLOB_UNKNOWN), the push checks and sends
        every blob, and the image lands complete."""
        target = repo(registry, "customer-d")
        path = target.split("/", 1)[1]
        image = variant(base, store, "deleted")
        push(image, [f"{target}:1"], retry=FAST)
        config_layer = image.layers[-1].descriptor.digest
        request = urllib.request.Request(
            f"{registry.url}/v2/{path}/blobs/{config_layer}", method="DELETE"
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            assert response.status == 202
        client = RegistryClient(registry.host, retry=FAST)
        assert not client.blob_exists(path, config_layer)
        mark = len(registry.requests())
        report = push(image, [f"{target}:2"], retry=FAST)
        assert client.blob_exists(path, config_layer)
        assert client.manifest_digest(path, "2") == image.manifest_digest
        assert report.manifest_digest == image.manifest_digest
        puts = [r.status for r in registry.manifest_puts(since=mark)]
        assert puts == [400, 201]  # refused for the missing blob, then accepted

    def test_bad_targets(self, registry: Registry, image: AssembledImage) -> None:
        """Targets must be registry/repository:tag."""
        with pytest.raises(ImageError, match="must be registry/repository:tag"):
            push(image, [f"{registry.host}/ivd/x"], retry=FAST)
        with pytest.raises(ImageError, match="does not name a registry"):
            push(image, ["ivd/x:1"], retry=FAST)


# -- faults: a registry answering 503 ------------------------------------------------------------


class FaultProxy:
    """An HTTP proxy to the registry that answers 503 where ``rule(method, path)`` says so, and
    says nothing at all (a stalled registry: the connection stays open) where ``stall`` does."""

    def __init__(
        self,
        upstream: str,
        rule: Callable[[str, str], bool],
        stall: Callable[[str, str], bool] = lambda method, path: False,
    ) -> None:
        self.upstream = upstream
        self.rule = rule
        self.injected: list[tuple[str, str]] = []
        self.stalled: list[tuple[str, str]] = []
        self.closing = threading.Event()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def _forward(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                if proxy.stall(self.command, self.path):
                    proxy.stalled.append((self.command, self.path.split("?")[0]))
                    proxy.closing.wait(120)  # never answers (until the test ends)
                    return
                if proxy.rule(self.command, self.path):
                    proxy.injected.append((self.command, self.path.split("?")[0]))
                    payload = b'{"errors":[{"code":"UNAVAILABLE","message":"injected fault"}]}'
                    self.send_response(503)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                    return
                conn = http.client.HTTPConnection(proxy.upstream, timeout=60)
                headers = {k: v for k, v in self.headers.items() if k.lower() != "connection"}
                conn.request(self.command, self.path, body=body, headers=headers)
                response = conn.getresponse()
                data = response.read()
                self.send_response(response.status, response.reason)
                for key, value in response.getheaders():
                    if key.lower() in ("transfer-encoding", "connection", "content-length"):
                        continue
                    self.send_header(key, value)
                length_header = response.getheader("Content-Length")
                if self.command == "HEAD":
                    self.send_header("Content-Length", length_header or "0")
                else:
                    self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                conn.close()

            do_GET = do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = _forward

        self.stall = stall
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.host = f"127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.closing.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def fault_proxy(registry: Registry) -> Iterator[Callable[..., FaultProxy]]:
    proxies: list[FaultProxy] = []

    def start(
        rule: Callable[[str, str], bool],
        stall: Callable[[str, str], bool] = lambda method, path: False,
    ) -> FaultProxy:
        proxies.append(FaultProxy(registry.host, rule, stall))
        return proxies[-1]

    yield start
    for proxy in proxies:
        proxy.close()


class TestFaults:
    def test_transient_503_is_retried(
        self, registry: Registry, image: AssembledImage, fault_proxy: Callable[..., FaultProxy]
    ) -> None:
        """The first two blob PUTs fail with 503; the push retries and succeeds."""
        budget = {"left": 2}

        def rule(method: str, path: str) -> bool:
            if method == "PUT" and "/blobs/uploads/" in path and budget["left"]:
                budget["left"] -= 1
                return True
            return False

        proxy = fault_proxy(rule)
        target = repo(registry, "flaky").replace(registry.host, proxy.host)
        report = push(image, [f"{target}:1"], retry=FAST)
        assert len(proxy.injected) == 2
        # Through the proxy the base registry looks like another host: base layers go up too.
        assert report.count("uploaded") == len(image.layers) + 1
        client = RegistryClient(registry.host, retry=FAST)
        assert client.manifest_digest(target.split("/", 1)[1], "1") == image.manifest_digest

    def test_resolve_retries_a_failing_tag_list(
        self, pushed_base: dict[str, str], fault_proxy: Callable[..., FaultProxy]
    ) -> None:
        """A 503 on the tag list and on the manifest GET is retried; resolution succeeds."""
        failed: set[str] = set()

        def rule(method: str, path: str) -> bool:
            kind = "tags" if "/tags/list" in path else "manifest" if "/manifests/" in path else ""
            if kind and kind not in failed:
                failed.add(kind)
                return True
            return False

        proxy = fault_proxy(rule)
        base = resolve_base(f"{proxy.host}/{BASE_REPO}", "~=2.4", retry=FAST)
        assert base.digest == pushed_base["2.4.1"]
        assert failed == {"tags", "manifest"}

    def test_persistent_503_fails_clearly_and_moves_no_tag(
        self,
        registry: Registry,
        base: BaseImage,
        store: BlobStore,
        fault_proxy: Callable[..., FaultProxy],
    ) -> None:
        """Manifest PUTs keep failing: bounded retries, one clear line, the tag stays put."""
        target = repo(registry, "broken")
        path = target.split("/", 1)[1]
        old, new = variant(base, store, "old"), variant(base, store, "new")
        push(old, [f"{target}:latest"], retry=FAST)
        proxy = fault_proxy(lambda method, p: method == "PUT" and "/manifests/" in p)
        via_proxy = target.replace(registry.host, proxy.host)
        with pytest.raises(ImageError) as info:
            push(new, [f"{via_proxy}:latest"], retry=FAST)
        assert str(info.value) == (
            f"registry {proxy.host}: pushing manifest {path}:latest failed "
            "after 3 attempts: 503 Service Unavailable (UNAVAILABLE injected fault)"
        )
        assert len(proxy.injected) == 3
        assert (
            RegistryClient(registry.host, retry=FAST).manifest_digest(path, "latest")
            == old.manifest_digest
        )

    @pytest.mark.parametrize("stalls", ["HEAD", "PUT"], ids=["on a blob check", "on an upload"])
    def test_a_stalled_registry_fails_within_the_deadline(
        self,
        registry: Registry,
        image: AssembledImage,
        fault_proxy: Callable[..., FaultProxy],
        stalls: str,
    ) -> None:
        """A registry that accepts the request and never answers: the push gives up once the
        deadline has passed (not after every attempt's full timeout), in one line naming the
        host; the tag is not written."""
        stalled = RetryPolicy(
            attempts=4, backoff=0.05, read_timeout=1, transfer_timeout=1, deadline=1.5
        )
        proxy = fault_proxy(
            lambda method, path: False,
            stall=lambda method, path: method == stalls and "/blobs/" in path,
        )
        target = repo(registry, f"stalled-{stalls.lower()}").replace(registry.host, proxy.host)
        with pytest.raises(ImageError) as info:
            push(image, [f"{target}:1"], retry=stalled)
        message = str(info.value)
        assert "\n" not in message and message.startswith(f"registry {proxy.host} did not answer")
        assert len(proxy.stalled) == 2  # tried again within the deadline, not 4 times
        path = target.split("/", 1)[1]
        assert RegistryClient(registry.host, retry=FAST).manifest_digest(path, "1") is None

    def test_the_default_bounds_of_a_stall(self) -> None:
        """What the CLI uses: a stalled answer costs at most a minute and a half (the deadline
        and one timeout), a stalled blob transfer the same and one silence of two minutes."""
        policy = RetryPolicy()
        assert policy.deadline + policy.read_timeout <= 90
        assert policy.deadline + policy.transfer_timeout <= 180


# -- auth ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def auth_registry() -> Iterator[Registry]:
    """A second registry, with htpasswd basic auth (the session registry has none)."""
    reg = start_registry(auth=True)
    yield reg
    reg.stop()


class TestAuth:
    def test_wrong_password_is_a_clear_error_without_the_secret(
        self, auth_registry: Registry, image: AssembledImage
    ) -> None:
        """401 with wrong credentials: names the registry, not the password."""
        secret = "wrong-" + secrets.token_hex(8)
        assert auth_registry.username is not None
        with pytest.raises(ImageError) as info:
            push(
                image,
                [f"{auth_registry.host}/ivd/customer-x:1"],
                credentials={auth_registry.host: (auth_registry.username, secret)},
                retry=FAST,
            )
        text = f"{info.value} {info.value!r} {info.value.hint} {info.value.__cause__!r}"
        assert secret not in text
        assert base64.b64encode(f"{auth_registry.username}:{secret}".encode()).decode() not in text
        assert str(info.value).startswith(f"registry {auth_registry.host} rejected the credentials")
        assert "401" in str(info.value)

    def test_no_credentials(
        self,
        auth_registry: Registry,
        image: AssembledImage,
        tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        """A registry that wants a login and none configured: say how to log in."""
        monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path))
        monkeypatch.setenv("HOME", str(tmp_path))
        monkeypatch.delenv("ORAS_USER", raising=False)
        with pytest.raises(
            ImageError, match="requires a login and no credentials were found"
        ) as info:
            push(image, [f"{auth_registry.host}/ivd/customer-x:1"], retry=FAST)
        assert info.value.hint and "docker login" in info.value.hint

    def test_docker_config_credentials_and_cross_registry_push(
        self,
        auth_registry: Registry,
        image: AssembledImage,
        tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        """Credentials from $DOCKER_CONFIG; base layers come from the other registry."""
        auth = base64.b64encode(
            f"{auth_registry.username}:{auth_registry.password}".encode()
        ).decode()
        (tmp_path / "config.json").write_text(
            json.dumps({"auths": {auth_registry.host: {"auth": auth}}})
        )
        monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path))
        monkeypatch.setenv("HOME", str(tmp_path))
        report = push(image, [f"{auth_registry.host}/ivd/customer-x:1"], retry=FAST)
        assert report.count("mounted") == 0
        assert report.count("uploaded") + report.count("present") == len(image.layers) + 1
        again = push(image, [f"{auth_registry.host}/ivd/customer-x:1"], retry=FAST)
        assert again.count("uploaded") == 0


# -- files and the engine ------------------------------------------------------------------------


class TestFilesAndEngine:
    def test_docker_load(
        self, image: AssembledImage, docker_client: Any, weights: dict[str, Path]
    ) -> None:
        """The docker archive loads; the engine's image id is our config digest; files match."""
        tag = f"ivd-test/customer-x:load-{secrets.token_hex(3)}"
        ids = load_into_docker(image, [tag], docker_client)
        try:
            assert ids == [image.image_id]
            listing = run_in_image(
                docker_client, tag, "cd /app && find . -type f -exec sha256sum {} + | sort -k2"
            )
            assert listing == expected_listing(weights)
        finally:
            docker_client.images.remove(tag, force=True)

    def test_layout_from_a_registry_base(self, image: AssembledImage, tmp_path: Path) -> None:
        """Writing a layout fetches the base layers; skopeo reads it and the archive too."""
        out = write_oci_layout(image, tmp_path / "layout", ["2.4.1-abc"])
        info = json.loads(
            subprocess.run(
                ["skopeo", "inspect", f"oci:{out}:2.4.1-abc"],
                capture_output=True,
                text=True,
                check=True,
            ).stdout
        )
        assert info["Digest"] == image.manifest_digest
        subprocess.run(
            ["skopeo", "copy", f"oci:{out}:2.4.1-abc", f"dir:{tmp_path / 'dir'}"],
            capture_output=True,
            check=True,
            timeout=120,
        )
        write_docker_archive(image, tmp_path / "image.tar", ["ivd/x:1"])
        assert (tmp_path / "image.tar").stat().st_size > sum(
            x.descriptor.size for x in image.layers
        )

    def test_air_gapped_base_from_layout(
        self, image: AssembledImage, tmp_path: Path, weights: dict[str, Path], registry: Registry
    ) -> None:
        """A base exported as an OCI layout resolves to the same digest and the same image."""
        layout_dir = tmp_path / "air"
        subprocess.run(
            [
                "skopeo",
                "copy",
                "--preserve-digests",
                "--src-tls-verify=false",
                f"docker://{image.base.repository}@{image.base.digest}",
                f"oci:{layout_dir}:{image.base.version}",
            ],
            capture_output=True,
            check=True,
            timeout=300,
        )
        air = resolve_base(f"oci:{layout_dir}", "~=2.4")
        assert air.digest == image.base.digest and air.version == image.base.version
        rebuilt = assemble(
            air,
            layer_specs(weights),
            labels=LABELS,
            annotations={},
            source_date_epoch=SDE,
            store=BlobStore(tmp_path / "cache"),
        )
        # Same layers and config content except for the base's recorded name.
        assert [x.descriptor for x in rebuilt.layers] == [x.descriptor for x in image.layers]
        target = repo(registry, "air")
        report = push(rebuilt, [f"{target}:1"], retry=FAST)
        assert report.manifest_digest == rebuilt.manifest_digest


def _export_variants(base_layout: str, cache: str, layout: str, worker: int) -> None:
    """One concurrent build: assemble its own small images and export each into one layout."""
    base = resolve_base(f"oci:{base_layout}", "~=1.0")
    store = BlobStore(cache)
    for i in range(5):
        image = variant(base, store, f"worker {worker} image {i}")
        write_oci_layout(image, layout, [f"w{worker}-{i}", f"w{worker}-{i}-moving"])


def test_concurrent_exports_into_one_oci_layout_keep_every_tag(tmp_path: Path) -> None:
    """16 builds exporting into one --oci-layout at once: every tag survives, each pointing to
    the image its build made, and skopeo reads the layout."""
    import multiprocessing

    from test_assemble import make_base_layout

    from builder.oci import read_layout_index

    make_base_layout(tmp_path / "bases")
    layout = tmp_path / "out"
    context = multiprocessing.get_context("fork")
    workers = [
        context.Process(
            target=_export_variants,
            args=(str(tmp_path / "bases"), str(tmp_path / "cache"), str(layout), w),
        )
        for w in range(16)
    ]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(300)
        assert worker.exitcode == 0
    entries = {e.ref_name: e.descriptor.digest for e in read_layout_index(layout)}
    assert len(entries) == 16 * 5 * 2
    base = resolve_base(f"oci:{tmp_path / 'bases'}", "~=1.0")
    expected = variant(base, BlobStore(tmp_path / "check"), "worker 7 image 3").manifest_digest
    assert entries["w7-3"] == entries["w7-3-moving"] == expected
    inspect = subprocess.run(
        ["skopeo", "inspect", f"oci:{layout}:w7-3"], capture_output=True, text=True, check=True
    )
    assert json.loads(inspect.stdout)["Digest"] == expected


def test_image_differences_name_inputs_then_layers() -> None:
    """Recorded inputs side by side (a missing format label is format 1); when every input
    agrees, the layers that differ."""
    from builder.image.provenance import image_differences

    def image(labels: dict[str, str], config_layer: str) -> tuple[dict[str, Any], dict[str, Any]]:
        manifest = {
            "layers": [
                {"digest": "sha256:" + "b" * 64},
                {"digest": config_layer, "annotations": {"com.ivd.layer.name": "config"}},
            ]
        }
        return manifest, {"config": {"Labels": labels}}

    commit_a, commit_b = "a" * 40, "c" * 40
    tagged = image({"org.opencontainers.image.revision": commit_a}, "sha256:" + "1" * 64)
    built = image(
        {"org.opencontainers.image.revision": commit_b, "com.ivd.layer-format": "3"},
        "sha256:" + "2" * 64,
    )
    assert image_differences(tagged, built) == [
        "config commit: aaaaaaaaaaaa (tagged) vs cccccccccccc (this build)",
        "image format: 1 (tagged) vs 3 (this build)",
    ]
    same = {"org.opencontainers.image.revision": commit_a}
    assert image_differences(
        image(same, "sha256:" + "1" * 64), image(same, "sha256:" + "2" * 64)
    ) == ["layer config: sha256:111111111111 (tagged) vs sha256:222222222222 (this build)"]
