"""What a newcomer meets after `make run`: the files under var/demo/ and the printed
commands, each run as printed (a shell, the installed `egret`, paths relative to where
they were written) against the four real services; the grpcurl command replayed with its
own flags through server reflection (grpcurl itself is not installable here); and the
demo itself, which writes them and prints them."""

from __future__ import annotations

import json
import os
import random
import re
import shlex
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from google.protobuf import descriptor_pool, json_format, message_factory
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from devtools.cluster import REPO_ROOT, Cluster
from devtools.first_contact import Command, FirstContact, write_first_contact
from devtools.oidc.config import SAMPLE_RESIDENT_ID

pytestmark = pytest.mark.e2e

BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def contact(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Cluster, FirstContact, Path]]:
    root = tmp_path_factory.mktemp("newcomer")
    with Cluster(root / "var" / "demo") as cluster:
        cluster.wait_healthy()
        (root / ".venv").symlink_to(Path(sys.prefix))  # the repository's venv, as make setup made it
        here = Path.cwd()
        os.chdir(root)  # the commands name files relative to where make run was started
        try:
            written = write_first_contact(cluster, Path("var/demo"))
        finally:
            os.chdir(here)
        yield cluster, written, root


def sh(
    command: str, root: Path, exports: dict[str, str], *, activated: bool = False
) -> subprocess.CompletedProcess[str]:
    """`command` in bash from `root`; `activated`: with the venv's bin first on PATH, as after
    `source .venv/bin/activate` (the guide's commands); else as a fresh shell has it."""
    path = f"{BIN}:{os.environ['PATH']}" if activated else os.environ["PATH"].replace(f"{BIN}:", "")
    inherited = {k: v for k, v in os.environ.items() if k not in ("EGRET_PROFILE", "EGRET_CONFIG")}
    env = {**inherited, **exports, "PATH": path, "COLUMNS": "200", "NO_COLOR": "1"}
    return subprocess.run(
        ["bash", "-c", command], cwd=root, env=env, capture_output=True, text=True, timeout=300, check=False
    )


def step(contact: FirstContact, starts: str) -> Command:
    return next(command for command in contact.commands if command.shell.startswith(starts))


def test_the_readme_lists_the_commands_and_every_file_it_names_exists(
    contact: tuple[Cluster, FirstContact, Path],
) -> None:
    cluster, written, root = contact
    readme = (root / "var/demo/README.md").read_text()
    for command in written.commands:
        assert command.shell in readme
    for name in ("ingest", "rules", "score", "query"):
        assert cluster.address(name) in readme
    for relative in re.findall(r"var/demo/[\w./-]+", "\n".join(c.shell for c in written.commands)):
        assert (root / relative).exists(), relative
    for role in ("department", "reviewer", "auditor", "admin", "benefit-provider", "subject"):
        assert (root / "var/demo/tokens" / f"{role}.token").stat().st_mode & 0o777 == 0o600


def test_the_printed_egret_commands_work_as_printed(contact: tuple[Cluster, FirstContact, Path]) -> None:
    cluster, written, root = contact
    exports: dict[str, str] = {}  # each printed command stands alone

    submitted = sh(
        step(written, ".venv/bin/egret --config var/demo/egret.yaml -p department submit").shell,
        root,
        exports,
    )
    assert submitted.returncode == 0, submitted.stderr
    assert "13" in submitted.stdout
    cluster.wait_drained()

    score = sh(
        step(written, ".venv/bin/egret --config var/demo/egret.yaml -p reviewer score get").shell,
        root,
        exports,
    )
    assert score.returncode == 0, score.stderr
    assert "+5" in score.stdout or "5" in score.stdout

    explained = sh(
        step(written, ".venv/bin/egret --config var/demo/egret.yaml -p reviewer score explain").shell,
        root,
        exports,
    )
    assert explained.returncode == 0, explained.stderr
    assert "library.late_return" in explained.stdout
    assert "library.returns_on_time" in explained.stdout

    backtest = sh(
        step(written, ".venv/bin/egret --config var/demo/egret.yaml -p admin rules backtest").shell,
        root,
        exports,
    )
    assert backtest.returncode == 0, backtest.stderr
    assert "started for rule set 2" in backtest.stderr  # the guide says make run stores draft 2
    assert "succeeded" in backtest.stdout.lower()


def test_the_printed_grpcurl_command_reads_the_score(contact: tuple[Cluster, FirstContact, Path]) -> None:
    """grpcurl -cacert/-cert/-key -H -d ADDRESS METHOD, replayed: the same files, header and
    JSON body, the method and its message types found by server reflection."""
    cluster, written, root = contact
    command = step(written, "grpcurl").shell
    token_file = re.search(r"\$\(cat ([^)]+)\)", command)
    assert token_file is not None
    command = command.replace(token_file.group(0), (root / token_file.group(1)).read_text().strip())
    args = shlex.split(command)[1:]
    flags = dict(zip(args[0:-2:2], args[1:-2:2], strict=True))
    address, method = args[-2:]
    assert address == cluster.address("query")
    credentials = grpc.ssl_channel_credentials(
        root_certificates=(root / flags["-cacert"]).read_bytes(),
        private_key=(root / flags["-key"]).read_bytes(),
        certificate_chain=(root / flags["-cert"]).read_bytes(),
    )
    with grpc.secure_channel(address, credentials) as channel:
        pool = descriptor_pool.DescriptorPool(ProtoReflectionDescriptorDatabase(channel))
        service, name = method.split("/")
        found = pool.FindServiceByName(service).FindMethodByName(name)
        request_type = message_factory.GetMessageClass(found.input_type)
        response_type = message_factory.GetMessageClass(found.output_type)
        request = json_format.Parse(flags["-d"], request_type())
        call = channel.unary_unary(
            f"/{method}",
            request_serializer=request_type.SerializeToString,
            response_deserializer=response_type.FromString,
        )
        header, value = flags["-H"].split(": ", 1)
        reply = call(request, metadata=((header, value),), timeout=30)
    answer = json.loads(json_format.MessageToJson(reply, preserving_proto_field_name=True))
    assert answer["score"]["tier"]
    assert SAMPLE_RESIDENT_ID not in json.dumps(answer)


def test_make_run_writes_and_prints_them(tmp_path: Path) -> None:
    """The demo on a tiny population: it writes var/demo/ and prints the commands."""
    base = random.randrange(40_000, 60_000, 10)
    done = subprocess.run(
        [sys.executable, "-m", "devtools.demo", "--subjects", "60", "--exit-after-summary",
         "--data-dir", str(tmp_path / "demo"), "--base-port", str(base),
         "--portal-port", str(base + 5), "--provider-port", str(base + 6)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert f"ingest  127.0.0.1:{base}" in done.stdout or "port" in done.stdout
    readme = (tmp_path / "demo" / "README.md").read_text()
    for line in readme.split("```sh\n", 1)[1].split("```", 1)[0].splitlines():
        if not line.startswith("#"):
            assert line in done.stdout
    assert (tmp_path / "demo" / "egret.yaml").exists()


def blocks(markdown: str, language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", markdown, flags=re.DOTALL)


def test_every_command_of_the_integrators_guide_runs(contact: tuple[Cluster, FirstContact, Path]) -> None:
    """docs/integrators.md: each shell line in order (grpcurl replayed as above), then the Python example."""
    cluster, written, root = contact
    guide = (REPO_ROOT / "docs" / "integrators.md").read_text()
    exports: dict[str, str] = {}
    lines = [line for block in blocks(guide, "sh") for line in block.splitlines() if line.strip()]
    assert len(lines) >= 6
    for line in lines:
        if line.startswith("export "):
            name, value = line.removeprefix("export ").split("=", 1)
            exports[name] = str(root / value)
            continue
        if line.startswith("grpcurl "):
            # The guide shows make run's port; the test's cluster listens on a free one.
            assert line.replace("127.0.0.1:50054", cluster.address("query")) == step(written, "grpcurl").shell
            continue
        done = sh(line, root, exports, activated=True)
        assert done.returncode == 0, f"{line}\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}"
        if " submit " in line:
            cluster.wait_drained()
    (python,) = blocks(guide, "python")
    ran = subprocess.run(
        [sys.executable, "-c", python], cwd=root, env={**os.environ, **exports},
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert ran.returncode == 0, ran.stderr
    assert re.search(r"^score \d+ tier \w+$", ran.stdout, flags=re.MULTILINE), ran.stdout
    assert "INVALID_ARGUMENT" in ran.stdout
    assert "purpose" in ran.stdout
