"""The built image (make image) holds what a release runs and nothing more, and the four services
run from it through the end-to-end scenario.

buildah runs every command inside the image (chroot isolation: no container engine here), and
runs the services with the host's network, their PKI (and SQLite databases) in a directory
mounted at the same path, or on the local PostgreSQL. These tests need the image, so they run
when `make image-check` asks for them (EGRET_IMAGE_CHECK=1, after building it; CI runs that
beside `make test`) and skip otherwise: a `make test` running while the image is being rebuilt
must not race it.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import psutil
import pytest

from devtools.cluster import SERVICES, Cluster
from tests.support.databases import create_postgres_database, drop_postgres_database
from tests.support.scenario import (
    EXPECTED,
    SCENARIO,
    assert_expected_scores,
    assert_scores_equal_recompute,
    submit_all,
)

pytestmark = pytest.mark.e2e

IMAGE = os.environ.get("EGRET_IMAGE", "localhost/egret:ci")
UID = 10001
# One store holds one storage driver; deploy/image/build.sh uses vfs.
BUILDAH = ("buildah", "--storage-driver", "vfs")

if not os.environ.get("EGRET_IMAGE_CHECK"):
    pytest.skip("image checks run with make image-check (it builds the image first)", allow_module_level=True)


@pytest.fixture(scope="module")
def container() -> Iterator[str]:
    """A working container of the image; every command below runs in it."""
    if shutil.which("buildah") is None:
        pytest.fail("buildah is missing: make image installs it (as root)")
    found = subprocess.run([*BUILDAH, "inspect", "--type", "image", IMAGE], capture_output=True, check=False)
    if found.returncode != 0:
        pytest.fail(f"no image {IMAGE}: make image builds it\n{found.stderr.decode()}")
    name = f"egret-image-check-{secrets.token_hex(4)}"
    subprocess.run([*BUILDAH, "from", "--pull=never", "--name", name, IMAGE], capture_output=True, check=True)
    try:
        yield name
    finally:
        subprocess.run([*BUILDAH, "rm", name], capture_output=True, check=False)


def run_args(
    container: str,
    command: Sequence[str],
    *,
    user: str | None = None,
    env: Mapping[str, str] | None = None,
    volumes: Sequence[Path] = (),
) -> list[str]:
    """`buildah run` of `command` in `container`, as the image's user unless `user` is given."""
    args = [*BUILDAH, "run", "--isolation", "chroot", "--network", "host"]
    if user is not None:
        args += ["--user", user]
    for volume in volumes:
        args += ["--volume", f"{volume}:{volume}"]
    for key, value in (env or {}).items():
        args += ["--env", f"{key}={value}"]
    return [*args, container, "--", *command]


def run(container: str, *command: str, user: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        run_args(container, command, user=user),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def python(container: str, code: str, *, user: str | None = None) -> str:
    done = run(container, "python", "-c", code, user=user)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_the_image_runs_as_the_numeric_non_root_user(container: str) -> None:
    assert run(container, "id", "-u").stdout.strip() == str(UID)
    assert run(container, "id", "-g").stdout.strip() == str(UID)


def test_the_runtime_stage_has_no_compiler(container: str) -> None:
    found = python(
        container,
        "import glob, shutil; names = ('gcc', 'cc', 'c++', 'g++', 'clang', 'ld', 'as', 'make');"
        "print(sorted({*filter(None, map(shutil.which, names)), *glob.glob('/usr/bin/*-gcc*')}))",
    )
    assert found == "[]"


@pytest.mark.parametrize("user", [None, "0:0"], ids=["egret", "root"])
def test_no_package_manager_can_run_even_as_root(container: str, user: str | None) -> None:
    # apt and dpkg are removed from the runtime stage (their database stays, for scanners), and
    # so is pip: neither the base's nor the virtual environment's, nor ensurepip to bring it back.
    programs = ("apt", "apt-get", "apt-cache", "dpkg", "dpkg-deb", "pip", "pip3", "pip3.11", "easy_install")
    on_path = python(container, f"import shutil; print([p for p in {programs!r} if shutil.which(p)])")
    assert on_path == "[]"
    assert python(container, "import glob; print(glob.glob('/opt/egret/bin/pip*'))") == "[]"
    for module in ("pip", "ensurepip"):
        done = run(container, "python", "-m", module, "--version", user=user)
        assert done.returncode != 0
        assert f"No module named {module}" in done.stderr
    assert run(container, "sh", "-c", "test -s /var/lib/dpkg/status").returncode == 0


def test_no_pip_cache_is_left_in_the_image(container: str) -> None:
    # As root, so no directory is hidden from the search by its permissions.
    done = run(
        container,
        "find", "/", "-xdev", "(", "-path", "/proc", "-o", "-path", "/sys", ")", "-prune", "-o",
        "-type", "d", "(", "-path", "*/.cache/pip", "-o", "-path", "*/.cache/pip-*",
        "-o", "-name", "pip-wheel-*", ")", "-print",
        user="0:0",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout == ""
    assert run(container, "test", "-e", "/root/.cache", user="0:0").returncode != 0


@pytest.mark.parametrize("entry_point", [*SERVICES, "portal"])
def test_every_entry_point_answers_from_the_image(container: str, entry_point: str) -> None:
    done = run(container, "python", "-m", f"services.{entry_point}", "--help")
    assert done.returncode == 0, done.stderr
    assert "serve" in done.stdout


def service_processes(cluster: Cluster) -> dict[str, psutil.Process]:
    """Each service's Python process, the child of its `buildah run`."""
    found = {}
    for name in cluster.services:
        children = psutil.Process(cluster.pid(name)).children(recursive=True)
        (found[name],) = [c for c in children if c.name().startswith("python")]
    return found


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def database_urls(request: pytest.FixtureRequest) -> Iterator[dict[str, str]]:
    """{} for the cluster's own SQLite files; else a PostgreSQL database per service (on
    127.0.0.1, which the services reach over the host's network with the image's libpq)."""
    if request.param == "sqlite":
        yield {}
        return
    urls = {name: create_postgres_database() for name in SERVICES}
    try:
        yield urls
    finally:
        for url in urls.values():
            drop_postgres_database(url)


@pytest.fixture
def image_cluster(container: str, tmp_path: Path, database_urls: dict[str, str]) -> Iterator[Cluster]:
    data_dir = tmp_path / "cluster"

    def in_image(args: Sequence[str], env: Mapping[str, str]) -> list[str]:
        # The service's own settings only: the host's PATH, HOME and the rest are the image's own.
        settings = {k: v for k, v in env.items() if k.startswith(("EGRET_", "OTEL_"))}
        return run_args(container, ["python", *args], env=settings, volumes=[data_dir])

    cluster = Cluster(
        data_dir,
        database_urls=database_urls,
        env={"EGRET_RELAY_POLL_SECONDS": "0.05", "EGRET_RELAY_BACKOFF_MAX_SECONDS": "1"},
        launcher=in_image,
    )
    # The services run as the image's user: the PKI and the databases' directory are theirs.
    for directory, _, files in os.walk(data_dir):
        for path in (directory, *(os.path.join(directory, f) for f in files)):
            os.chown(path, UID, UID)
    with cluster:
        yield cluster


async def test_the_end_to_end_scenario_runs_on_the_services_of_the_image(image_cluster: Cluster) -> None:
    processes = service_processes(image_cluster)
    assert set(processes) == set(SERVICES)
    assert {p.uids().effective for p in processes.values()} == {UID}

    responses = await submit_all(image_cluster)
    assert sum(r.counts.accepted for r in responses) == len(SCENARIO)
    image_cluster.wait_drained(timeout_s=60)
    await assert_expected_scores(image_cluster)
    assert await assert_scores_equal_recompute(image_cluster) == len(EXPECTED)
    again = await submit_all(image_cluster)
    assert sum(r.counts.duplicate for r in again) == len(SCENARIO)

    # buildah ends its command with SIGKILL when it is itself stopped, so the orderly SIGTERM
    # (what Kubernetes sends) goes to each service's own process; each shuts down cleanly.
    for process in processes.values():
        process.send_signal(signal.SIGTERM)
    _, alive = psutil.wait_procs(list(processes.values()), timeout=30)
    assert not alive, f"still running 30 s after SIGTERM: {alive}"
    await asyncio.to_thread(wait_exited, image_cluster)
    assert image_cluster.stop() == dict.fromkeys(image_cluster.services, 0)


def wait_exited(cluster: Cluster, timeout_s: float = 10.0) -> None:
    """Until each `buildah run` has exited with its service's status (or the time is up)."""
    deadline = time.monotonic() + timeout_s
    while any(cluster.is_running(n) for n in cluster.services) and time.monotonic() < deadline:
        time.sleep(0.05)
