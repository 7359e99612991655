"""A local Egret: the four services as separate OS processes on loopback ports.

Used by the end to end tests, the demo and the benchmark. Each service runs as
`python -m services.<name>`, configured only by environment variables as in production,
with its own free port, its own log file in the shared data directory and, by default,
its own SQLite database there. Pass per-service database URLs to run on PostgreSQL.

With `rules_shards=N` (N > 1) rules runs as N processes named rules-0 .. rules-N-1, each
with its own port, log and database, and ingest routes to them by subject. With
`score_replicas=M` (M > 1) score runs as M processes named score-0 .. score-M-1 on one
shared database, rules shard i sending to replica i mod M.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO

import grpc
import sqlalchemy as sa
from grpc_health.v1 import health_pb2, health_pb2_grpc
from sqlalchemy.engine import Engine

from devtools.localpki import LocalPki, create_local_pki
from kit.db import create_engine
from kit.principal import Role
from kit.pseudonym import KeyLink, Pseudonymiser

SERVICES = ("score", "rules", "ingest", "query")
REPO_ROOT = Path(__file__).resolve().parents[1]
# The outbox tables whose emptiness means every accepted event has reached the ledger.
OUTBOXES = {"ingest": "ingest_outbox", "rules": "rules_outbox"}


# For load tests: one client principal drives far more calls than a tenant's rate limit.
UNLIMITED = {"EGRET_RATE_LIMIT_PER_SECOND": "1000000", "EGRET_RATE_LIMIT_BURST": "1000000"}

# One process per service serves every department of the sample catalogue (12), each
# streaming on its own StreamEvents call and holding it open while it has batches to send:
# the production default of 8 open streams per instance, sized for a replica among
# several, would leave the others refused until a stream closes (docs/deploy.md,
# "Sizing ingest for streaming departments"). Callers' `env` overrides these.
SINGLE_INSTANCE = {"EGRET_MAX_CONCURRENT_STREAMS": "16", "EGRET_MAX_CONCURRENT_RPCS": "24"}


# How a service process is run: given the interpreter's arguments (`-m services.<name>`) and the
# environment the cluster made for it, the command line to start. Without one the services run
# under the cluster's own Python; tests/deploy/test_image_run.py runs them in the built image.
Launcher = Callable[[Sequence[str], Mapping[str, str]], Sequence[str]]


class ClusterError(RuntimeError):
    """A service failed to start, died, or the pipeline did not drain in time."""


@dataclass
class _Process:
    popen: subprocess.Popen[bytes]
    log: IO[bytes]


def free_port() -> int:
    """A port free on loopback right now (the OS may hand it out again later, rarely)."""
    return free_ports(1)[0]


def free_ports(count: int) -> list[int]:
    """`count` distinct ports free on loopback right now: all held open together while they
    are picked, so one cluster never gets the same port twice (picked one at a time, a
    service's gRPC port once equalled another's admin port)."""
    with contextlib.ExitStack() as stack:
        ports = []
        for _ in range(count):
            sock = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            sock.bind(("127.0.0.1", 0))
            ports.append(int(sock.getsockname()[1]))
        return ports


class Cluster:
    """Starts, stops and watches the four services; a context manager that cleans up after itself.

    `env` applies to every service, `service_env[name]` to one (both override the
    cluster's own settings, e.g. OTEL_* or EGRET_LOG_LEVEL). `database_urls[name]`
    replaces a service's SQLite database; query reads score's URL. `ports[name]` fixes a
    service's loopback port (else a free one), `admin_ports[name]` its admin port. `launcher`
    runs each process another way (in the built image, say). With `rules_shards`
    > 1 the rules processes are named rules-0, rules-1, ...: `service_env["rules"]` applies
    to each of them, `service_env["rules-1"]` and `database_urls["rules-1"]` to one. With
    `score_replicas` > 1 the score processes are score-0, score-1, ...: `service_env["score"]`
    applies to each, and all share `database_urls["score"]`.
    """

    def __init__(
        self,
        data_dir: Path | str | None = None,
        *,
        env: Mapping[str, str] | None = None,
        service_env: Mapping[str, Mapping[str, str]] | None = None,
        database_urls: Mapping[str, str] | None = None,
        subject_key: str | None = None,
        subject_key_id: str = "k1",
        start_timeout_s: float = 60.0,
        shutdown_grace_s: float = 5.0,
        log_format: str = "json",
        log_level: str = "info",
        python: str = sys.executable,
        cwd: Path = REPO_ROOT,
        rules_shards: int = 1,
        score_replicas: int = 1,
        secure: bool = True,
        ports: Mapping[str, int] | None = None,
        admin_ports: Mapping[str, int] | None = None,
        launcher: Launcher | None = None,
    ) -> None:
        if rules_shards < 1 or score_replicas < 1:
            raise ValueError("rules_shards and score_replicas must be at least 1")
        if rules_shards > 1 and database_urls and "rules" in database_urls:
            raise ValueError("with rules shards, give each one its own URL (rules-0, rules-1, ...)")
        self.rules_names = (
            ("rules",) if rules_shards == 1 else tuple(f"rules-{i}" for i in range(rules_shards))
        )
        self.score_names = (
            ("score",) if score_replicas == 1 else tuple(f"score-{i}" for i in range(score_replicas))
        )
        # Every process of this cluster, in start order (downstream first).
        self.services = (*self.score_names, *self.rules_names, "ingest", "query")
        self._own_data_dir = data_dir is None
        self.data_dir = (
            Path(tempfile.mkdtemp(prefix="egret-cluster-")) if data_dir is None else Path(data_dir)
        )
        self.data_dir.mkdir(parents=True, exist_ok=True)
        # Security on, as in production: a throwaway CA, certificates and tokens per cluster.
        self.pki: LocalPki | None = create_local_pki(self.data_dir / "pki") if secure else None
        self.data_dir = self.data_dir.resolve()
        # A fresh random key per cluster: the data is throwaway, and no key is ever written down.
        self.subject_key = subject_key or secrets.token_hex(32)
        if len(self.subject_key.encode()) < 32:
            raise ValueError("the subject key must be at least 32 bytes")
        self.subject_key_id = subject_key_id
        # Rotations of the subject key (rotate_subject_key), in order: (key id, secret).
        self.subject_key_rotations: list[tuple[str, str]] = []
        self.start_timeout_s = start_timeout_s
        self.shutdown_grace_s = shutdown_grace_s
        self._env = dict(env or {})
        self._service_env = {name: dict(values) for name, values in (service_env or {}).items()}
        self._database_urls = {
            name: (database_urls or {}).get(name, f"sqlite:///{self.data_dir / name}.db")
            for name in (*self.services, "score")
        }
        for name in self.score_names:
            self._database_urls[name] = self._database_urls["score"]
        self._log_format = log_format
        self._log_level = log_level
        self._python = python
        self._cwd = cwd
        self._launcher = launcher
        # Free ports by default; `ports` fixes some (make run's documented 50051-50054).
        spare = iter(free_ports(2 * len(self.services)))
        self._addresses = {
            name: f"127.0.0.1:{(ports or {}).get(name) or next(spare)}" for name in self.services
        }
        # "score" reaches the first replica: every replica answers for the whole service.
        self._addresses.setdefault("score", self._addresses[self.score_names[0]])
        # Each service's admin port (kit.admin: /metrics, /healthz, /readyz), free unless fixed.
        self._admin_addresses = {
            name: f"127.0.0.1:{(admin_ports or {}).get(name) or next(spare)}" for name in self.services
        }
        self._processes: dict[str, _Process] = {}
        self._engines: dict[str, Engine] = {}

    # -- addresses and configuration ---------------------------------------------------

    def address(self, name: str) -> str:
        return self._addresses[name]

    def admin_url(self, name: str) -> str:
        """The base URL of a service's admin port (plaintext HTTP on loopback)."""
        return f"http://{self._admin_addresses[name]}"

    @property
    def python(self) -> str:
        """The interpreter the services run under (tools started beside them use it too)."""
        return self._python

    @property
    def cwd(self) -> Path:
        return self._cwd

    def database_url(self, name: str) -> str:
        return self._database_urls[name]

    def service_of(self, name: str) -> str:
        """The service a process runs: "rules" for rules-1, "score" for score-0."""
        if name in self.rules_names:
            return "rules"
        return "score" if name in self.score_names else name

    def log_path(self, name: str) -> Path:
        return self.data_dir / f"{name}.log"

    def anchor_file(self, name: str) -> Path:
        return self.data_dir / "audit-anchors" / f"{name}.anchors"

    def env_for(self, name: str) -> dict[str, str]:
        """The complete environment service `name` is started with."""
        if name not in self.services:
            raise KeyError(name)
        # Stray EGRET_* settings of the caller's shell would silently change the cluster.
        env = {k: v for k, v in os.environ.items() if not k.startswith("EGRET_")}
        env.update(
            PYTHONUNBUFFERED="1",
            EGRET_LISTEN_ADDRESS=self._addresses[name],
            EGRET_ADMIN_ADDRESS=self._admin_addresses[name],
            EGRET_DATA_DIR=str(self.data_dir),
            EGRET_DATABASE_URL=self._database_urls[name],
            EGRET_LOG_FORMAT=self._log_format,
            EGRET_LOG_LEVEL=self._log_level,
            EGRET_SHUTDOWN_GRACE_SECONDS=str(self.shutdown_grace_s),
            # Each process's audit head, appended every few seconds (verify-audit checks them).
            EGRET_AUDIT_ANCHOR_FILE=str(self.anchor_file(name)),
            EGRET_AUDIT_ANCHOR_SECONDS="5",
        )
        env.update(SINGLE_INSTANCE)
        if self.pki is None:
            env["EGRET_INSECURE"] = "true"
        else:
            env.update(self.pki.env(self.service_of(name)))
        if self.service_of(name) in ("ingest", "score", "query"):
            env["EGRET_SUBJECT_KEY"] = self.subject_key
        # Rules holds the rotations without the root key: it moves keys, never makes them.
        env["EGRET_SUBJECT_KEY_ID"] = self.subject_key_id
        if self.subject_key_rotations:
            env["EGRET_SUBJECT_KEY_ROTATIONS"] = ",".join(f"{i}:{s}" for i, s in self.subject_key_rotations)
        if name == "ingest":
            rules = [self._addresses[r] for r in self.rules_names]
            if len(rules) == 1:
                env["EGRET_RULES_ADDRESS"] = rules[0]
            else:
                env["EGRET_RULES_ADDRESSES"] = ",".join(rules)  # in shard order
        if name in self.rules_names:
            shard = self.rules_names.index(name)
            env["EGRET_SCORE_ADDRESS"] = self._addresses[self.score_names[shard % len(self.score_names)]]
            if len(self.rules_names) > 1:
                env["EGRET_RULES_SHARD"] = str(shard)
                env["EGRET_RULES_SHARDS"] = str(len(self.rules_names))
        if name == "query":
            env["EGRET_SCORE_DATABASE_URL"] = self._database_urls["score"]
            # Explain reads the active rule set; every shard holds the same rule sets.
            env["EGRET_RULES_ADDRESS"] = self._addresses[self.rules_names[0]]
        env.update(self._env)
        if self.service_of(name) != name:
            env.update(self._service_env.get(self.service_of(name), {}))
        env.update(self._service_env.get(name, {}))
        return env

    def add_env(self, values: Mapping[str, str]) -> None:
        """Settings for every service from its next (re)start, as if given as `env`
        (devtools.portal_stack adds the local OpenID provider as a trusted issuer)."""
        self._env.update(values)

    def rotate_subject_key(self, key_id: str) -> None:
        """Add a rotation of the subject key with a fresh secret. Running processes keep
        their generation; each holds the new one from its next (re)start, which re-keys
        its database first (docs/security.md, "Rotating the subject key")."""
        self.subject_key_rotations.append((key_id, secrets.token_hex(32)))

    @property
    def pseudonymiser(self) -> Pseudonymiser:
        """The cluster's key chain as configured now (the current generation's keys)."""
        links = tuple(KeyLink(i, s.encode()) for i, s in self.subject_key_rotations)
        return Pseudonymiser(self.subject_key.encode(), self.subject_key_id, links)

    def token(self, subject: str, role: Role) -> str:
        """A bearer token of this cluster's local identity provider."""
        if self.pki is None:
            return ""
        return self.pki.token(subject, role)

    def channel(self, name: str, token: str | None = None) -> grpc.aio.Channel:
        """A client channel to service `name`: TLS and `token` (an admin's by default)."""
        if self.pki is None:
            return grpc.aio.insecure_channel(self._addresses[name])
        return self.pki.channel(self._addresses[name], token or self.token("cluster-admin", Role.ADMIN))

    def sync_channel(self, name: str, token: str | None = None) -> grpc.Channel:
        """A blocking client channel, for tools that are not asynchronous."""
        if self.pki is None:
            return grpc.insecure_channel(self._addresses[name])
        return self.pki.sync_channel(self._addresses[name], token or self.token("cluster-admin", Role.ADMIN))

    def service_channel(self, name: str, as_service: str) -> grpc.aio.Channel:
        """A channel to `name` as service `as_service` calls it (mutual TLS, service token)."""
        if self.pki is None:
            return grpc.aio.insecure_channel(self._addresses[name])
        return self.pki.service_channel(self._addresses[name], as_service)

    def department_channel(self, source: str) -> grpc.aio.Channel:
        """A channel to ingest as department `source`."""
        return self.channel("ingest", self.token(source, Role.DEPARTMENT))

    # -- lifecycle ---------------------------------------------------------------------

    def start(self, name: str | None = None) -> None:
        """Start one service (or all that are not running) and wait until each is SERVING."""
        names = self.services if name is None else (name,)
        if name is None and len(self.score_names) > 1 and not self.is_running(self.score_names[0]):
            # The first replica migrates the shared database before the others start.
            self.start(self.score_names[0])
        started = []
        for service in names:
            if self.is_running(service):
                continue
            self._spawn(service)
            started.append(service)
        try:
            self.wait_healthy(started)
        except BaseException:
            if name is None:
                self.stop()
            raise

    def restart(self, name: str) -> None:
        self.stop(name)
        self.start(name)

    def is_running(self, name: str) -> bool:
        process = self._processes.get(name)
        return process is not None and process.popen.poll() is None

    def pid(self, name: str) -> int:
        return self._processes[name].popen.pid

    def _spawn(self, name: str) -> None:
        log = self.log_path(name).open("ab")
        log.write(f"--- egret cluster: starting {name} at {time.strftime('%Y-%m-%dT%H:%M:%S')}\n".encode())
        log.flush()
        args = ["-m", f"services.{self.service_of(name)}"]
        env = self.env_for(name)
        command = [self._python, *args] if self._launcher is None else list(self._launcher(args, env))
        popen = subprocess.Popen(
            command,
            cwd=self._cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            # Its own session, so a Ctrl-C meant for the demo reaches the services only as
            # the orderly SIGTERM that stop() sends.
            start_new_session=True,
        )
        self._processes[name] = _Process(popen, log)
        # The services run in their own sessions, so nothing else would stop them if the
        # caller exits without stop(); stop() is idempotent.
        atexit.register(self.stop)

    def wait_healthy(self, names: Iterable[str] | None = None, timeout_s: float | None = None) -> None:
        """Wait until every named service (default: all) answers SERVING; raise with its log
        tail if one cannot."""
        names = self.services if names is None else names
        deadline = time.monotonic() + (self.start_timeout_s if timeout_s is None else timeout_s)
        for name in names:
            with self._health_channel(name) as channel:
                stub = health_pb2_grpc.HealthStub(channel)
                last = "no answer"
                while True:
                    process = self._processes.get(name)
                    if process is None or process.popen.poll() is not None:
                        code = None if process is None else process.popen.returncode
                        raise ClusterError(
                            f"{name} exited with status {code} while starting\n{self.log_tail(name)}"
                        )
                    try:
                        response = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1.0)
                        if response.status == health_pb2.HealthCheckResponse.SERVING:
                            break
                        last = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
                    except grpc.RpcError as exc:
                        last = f"{exc.code().name}"
                    if time.monotonic() > deadline:
                        raise ClusterError(
                            f"{name} not SERVING in time (last: {last})\n{self.log_tail(name)}"
                        )
                    time.sleep(0.1)

    def _health_channel(self, name: str) -> grpc.Channel:
        if self.pki is None:
            return grpc.insecure_channel(self._addresses[name])
        # With the service's own certificate: rules and score require one (mutual TLS).
        base = self.service_of(name)
        credentials = grpc.ssl_channel_credentials(
            root_certificates=self.pki.ca_file.read_bytes(),
            private_key=self.pki.key_file(base).read_bytes(),
            certificate_chain=self.pki.cert_file(base).read_bytes(),
        )
        return grpc.secure_channel(self._addresses[name], credentials)

    def kill(self, name: str) -> None:
        """SIGKILL one service: a crash, for tests of recovery."""
        process = self._processes.get(name)
        if process is None:
            return
        if process.popen.poll() is None:
            process.popen.kill()
            process.popen.wait()
        process.log.close()
        del self._processes[name]

    def stop(self, name: str | None = None) -> dict[str, int]:
        """SIGTERM, wait for the graceful shutdown, SIGKILL what is left; return exit codes."""
        # Upstream first, so no service is left sending to one that is gone.
        order = ("ingest", *self.rules_names, *self.score_names, "query")
        names: list[str] = [n for n in order if n in self._processes]
        if name is not None:
            names = [name] if name in self._processes else []
        for service in names:
            popen = self._processes[service].popen
            if popen.poll() is None:
                popen.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self.shutdown_grace_s + 10.0
        codes: dict[str, int] = {}
        for service in names:
            process = self._processes.pop(service)
            try:
                process.popen.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.popen.kill()
                process.popen.wait()
            process.log.close()
            codes[service] = process.popen.returncode
        if name is None:
            self._dispose_engines()
        return codes

    def close(self, *, remove_data_dir: bool | None = None) -> None:
        """Stop everything; remove the data directory if the cluster made it (or if told to)."""
        self.stop()
        atexit.unregister(self.stop)
        if self._own_data_dir if remove_data_dir is None else remove_data_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)

    def __enter__(self) -> Cluster:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        # A failed run keeps its logs for a post-mortem.
        self.close(remove_data_dir=self._own_data_dir and exc_type is None)

    # -- observation -------------------------------------------------------------------

    def log_tail(self, name: str, lines: int = 40) -> str:
        path = self.log_path(name)
        if not path.exists():
            return f"({path} does not exist)"
        with path.open("rb") as handle:
            handle.seek(0, os.SEEK_END)
            handle.seek(max(0, handle.tell() - 64 * 1024))
            tail = handle.read().decode(errors="replace").splitlines()[-lines:]
        return f"--- last {len(tail)} lines of {path}:\n" + "\n".join(tail)

    def _engine(self, name: str) -> Engine:
        if name not in self._engines:
            self._engines[name] = create_engine(self._database_urls[name], read_only=True, pool_size=1)
        return self._engines[name]

    def _dispose_engines(self) -> None:
        for engine in self._engines.values():
            engine.dispose()
        self._engines.clear()

    def outbox_counts(self) -> dict[str, int | None]:
        """Rows waiting in each outbox; None where the table cannot be read (yet)."""
        counts: dict[str, int | None] = {}
        for name, table in self._outboxes().items():
            # Keyed by table; a rules shard's as "rules-1/rules_outbox", since each has one.
            key = table if name in OUTBOXES else f"{name}/{table}"
            try:
                with self._engine(name).connect() as connection:
                    counts[key] = int(
                        connection.execute(sa.text(f"SELECT count(*) FROM {table}")).scalar_one()
                    )
            except sa.exc.SQLAlchemyError:
                counts[key] = None
        return counts

    def _outboxes(self) -> dict[str, str]:
        """Service name → its outbox table, for every process that has one."""
        return {"ingest": OUTBOXES["ingest"], **dict.fromkeys(self.rules_names, OUTBOXES["rules"])}

    def wait_drained(self, timeout_s: float = 300.0, poll_s: float = 0.2) -> float:
        """Wait until every outbox is empty on two polls in a row; return the seconds waited.

        Ingest acknowledges only after committing to its outbox, and each relay deletes
        rows only after the next service committed them, so once everything sent has
        been acknowledged, two empty polls mean every event has reached the ledger.
        """
        started = time.monotonic()
        empty_polls = 0
        counts: dict[str, int | None] = {}
        while True:
            for name in self._outboxes():
                process = self._processes.get(name)
                if process is None or process.popen.poll() is not None:
                    raise ClusterError(f"{name} is not running while draining\n{self.log_tail(name)}")
            counts = self.outbox_counts()
            empty_polls = empty_polls + 1 if all(c == 0 for c in counts.values()) else 0
            if empty_polls >= 2:
                return time.monotonic() - started
            if time.monotonic() - started > timeout_s:
                raise ClusterError(f"pipeline not drained after {timeout_s:.0f}s: {counts}")
            time.sleep(poll_s)
