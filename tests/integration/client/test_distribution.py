"""The client's wheel stands alone: `make client-dist` builds it with the generated stubs and
the console script, and from an unpacked wheel (first on the path, outside the repository)
the library imports and `egret --help` runs."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

from devtools.cluster import REPO_ROOT


def test_the_wheel_carries_the_stubs_the_library_and_the_command(tmp_path: Path) -> None:
    built = subprocess.run(
        ["make", "--no-print-directory", "client-dist", f"CLIENT_DIST={tmp_path / 'dist'}"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert built.returncode == 0, built.stdout + built.stderr
    (wheel,) = (tmp_path / "dist").glob("egret_points_client-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        entry_points = next(n for n in names if n.endswith("entry_points.txt"))
        assert "egret = egret_client.cli.main:run" in archive.read(entry_points).decode()
        archive.extractall(tmp_path / "unpacked")
    for stub in ("egret/ingest/v1/ingest_service_pb2.py", "egret/query/v1/query_service_pb2_grpc.pyi"):
        assert stub in names
    assert {"egret_client/py.typed", "egret_client/connection.py", "egret_client/cli/main.py"} <= names

    env = {**os.environ, "PYTHONPATH": str(tmp_path / "unpacked")}
    probe = (
        "import egret, egret_client, egret_client.cli.main as cli; "
        "print(egret.__file__); print(egret_client.__file__); cli.app(['--help'], prog_name='egret')"
    )
    ran = subprocess.run(
        [sys.executable, "-c", probe], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60,
        check=False,
    )  # fmt: skip
    assert ran.returncode == 0, ran.stderr
    located, client, *_ = ran.stdout.splitlines()
    assert located.startswith(str(tmp_path / "unpacked"))
    assert client.startswith(str(tmp_path / "unpacked"))
    assert "submit" in ran.stdout
    assert "rules" in ran.stdout
