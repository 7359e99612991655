"""The web portal and the local OpenID provider beside a local cluster, as processes.

`make run`, the browser tests and the portal benchmark start them the same way:

    cluster = Cluster(data_dir)
    stack = PortalStack(cluster)          # before cluster.start(): the services must trust
    with cluster, stack:                  # the provider's tokens from their first start
        print(stack.url, stack.accounts)  # http://127.0.0.1:<port>, the sample accounts

`PortalStack(cluster)` picks the ports, writes what both need under
`<cluster data dir>/portal/` (the provider's JWKS, the portal's client secret and session
key) and adds the provider to the services' trusted issuers
(`Cluster.add_env`, `devtools.oidc_provider.verifier_env`). `start()` runs
`python -m devtools.oidc_provider` and `python -m services.portal`, each configured only
by its command line and `EGRET_*` environment as in production, waits until both answer,
and logs to `oidc-provider.log` and `portal.log` in the cluster's data directory. If the
cluster was already running, `start()` restarts query and score first so that they
accept the provider's tokens. `stop()` (or leaving the block) ends both processes.

The portal calls query and score over TLS with the local PKI's CA, its own client
certificate (score requires mutual TLS) and, for the public pages only, its service token
(the portal's scopes in kit.principal.SERVICE_SCOPES); people's pages use the signed-in person's own token.
"""

from __future__ import annotations

import atexit
import os
import signal
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO

import httpx

from devtools.cluster import Cluster, ClusterError, free_port
from devtools.localpki import PORTAL
from devtools.oidc.config import DEFAULT_PASSWORD, SAMPLE_RESIDENT_ID, SAMPLE_USCC, Account, sample_accounts
from devtools.oidc_provider import command, verifier_env, write_jwks

CLIENT_ID = "egret-portal"
# Services the provider's tokens reach through the portal: restarted to trust it if running.
_PORTAL_CALLS = ("score", "query")


@dataclass
class _Process:
    popen: subprocess.Popen[bytes]
    log: IO[bytes]


class PortalStack:
    """The local OpenID provider and the portal for `cluster` (module docstring).

    `portal_port` and `provider_port` 0 take free ports. `resident_id` and `uscc` name the
    sample resident and business (default: subjects of the demo population). `portal_env`
    adds or overrides the portal's settings (e.g. EGRET_PORTAL_SESSION_IDLE_SECONDS);
    `provider_args` are further command-line options of devtools.oidc_provider.
    """

    def __init__(
        self,
        cluster: Cluster,
        *,
        portal_port: int = 0,
        provider_port: int = 0,
        resident_id: str = SAMPLE_RESIDENT_ID,
        uscc: str = SAMPLE_USCC,
        portal_env: Mapping[str, str] | None = None,
        provider_args: Sequence[str] = (),
        log_format: str = "json",
        start_timeout_s: float = 30.0,
    ) -> None:
        if cluster.pki is None:
            raise ValueError("the portal stack needs a cluster with security on (its PKI)")
        self.cluster = cluster
        self.pki = cluster.pki
        self.portal_port = portal_port or free_port()
        self.provider_port = provider_port or free_port()
        self.url = f"http://127.0.0.1:{self.portal_port}"
        self.issuer = f"http://127.0.0.1:{self.provider_port}"
        self.accounts: tuple[Account, ...] = sample_accounts(resident_id=resident_id, uscc=uscc)
        self.password = DEFAULT_PASSWORD
        self.directory = cluster.data_dir / "portal"
        self.directory.mkdir(parents=True, exist_ok=True)
        self.jwks_file = write_jwks(self.pki.directory, self.directory / "oidc-jwks.json")
        self.client_secret_file = self._secret("client.secret", os.urandom(24).hex())
        # One key, 64 hex characters: above the portal's 32-byte minimum.
        self.session_secret_file = self._secret("session.key", os.urandom(32).hex())
        # The public pages' reads only (kit.principal.SERVICE_SCOPES["portal"]: published rules,
        # policy and benefits); 24 h, as the services' own tokens.
        self.service_token_file = self.pki.service_token_file(PORTAL)
        self._resident_id = resident_id
        self._uscc = uscc
        self._portal_env = dict(portal_env or {})
        self._provider_args = tuple(provider_args)
        self._log_format = log_format
        self._start_timeout_s = start_timeout_s
        self._processes: dict[str, _Process] = {}
        self._restart_first = [name for name in _PORTAL_CALLS if cluster.is_running(name)]
        cluster.add_env(verifier_env(self.issuer, self.jwks_file))

    def _secret(self, name: str, value: str) -> Path:
        path = self.directory / name
        path.write_text(value)
        path.chmod(0o600)
        return path

    # -- configuration -----------------------------------------------------------------

    def log_path(self, name: str) -> Path:
        """`name` is "portal" or "oidc-provider"."""
        return self.cluster.data_dir / f"{name}.log"

    @property
    def redirect_uri(self) -> str:
        return f"{self.url}/auth/callback"

    @property
    def post_logout_redirect_uri(self) -> str:
        return f"{self.url}/signed-out"

    def provider_command(self) -> list[str]:
        return command(
            port=self.provider_port,
            pki_dir=self.pki.directory,
            client_id=CLIENT_ID,
            client_secret_file=self.client_secret_file,
            redirect_uris=[self.redirect_uri],
            post_logout_redirect_uris=[self.post_logout_redirect_uri],
            extra=["--resident-id", self._resident_id, "--uscc", self._uscc, *self._provider_args],
        )

    def portal_env(self) -> dict[str, str]:
        """The complete environment the portal is started with."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("EGRET_")}
        env.update(
            PYTHONUNBUFFERED="1",
            EGRET_LISTEN_ADDRESS=f"127.0.0.1:{self.portal_port}",
            EGRET_PORTAL_PUBLIC_URL=self.url,
            EGRET_PORTAL_INSECURE_HTTP="true",
            EGRET_PORTAL_SESSION_SECRET_FILE=str(self.session_secret_file),
            EGRET_PORTAL_OIDC_ISSUER=self.issuer,
            EGRET_PORTAL_OIDC_CLIENT_ID=CLIENT_ID,
            EGRET_PORTAL_OIDC_CLIENT_SECRET_FILE=str(self.client_secret_file),
            EGRET_QUERY_ADDRESS=self.cluster.address("query"),
            EGRET_SCORE_ADDRESS=self.cluster.address("score"),
            EGRET_RULES_ADDRESS=self.cluster.address(self.cluster.rules_names[0]),
            EGRET_INGEST_ADDRESS=self.cluster.address("ingest"),
            EGRET_TLS_CA_FILE=str(self.pki.ca_file),
            EGRET_TLS_CERT_FILE=str(self.pki.cert_file(PORTAL)),
            EGRET_TLS_KEY_FILE=str(self.pki.key_file(PORTAL)),
            EGRET_SERVICE_TOKEN_FILE=str(self.service_token_file),
            EGRET_LOG_FORMAT=self._log_format,
        )
        env.update(self._portal_env)
        return env

    # -- lifecycle ---------------------------------------------------------------------

    def start(self) -> None:
        """Start the provider, then the portal; return once both answer. On failure both are
        stopped and ClusterError carries the log tail."""
        for name in self._restart_first:
            self.cluster.restart(name)
        self._restart_first = []
        try:
            self._spawn("oidc-provider", self.provider_command(), None)
            self._wait(
                "oidc-provider",
                f"{self.issuer}/.well-known/openid-configuration",
                lambda r: r.status_code == 200 and r.json().get("issuer") == self.issuer,
            )
            self._spawn("portal", [self.cluster.python, "-m", "services.portal"], self.portal_env())
            self._wait("portal", f"{self.url}/healthz", lambda r: r.status_code == 200)
        except BaseException:
            self.stop()
            raise

    def _spawn(self, name: str, argv: list[str], env: dict[str, str] | None) -> None:
        log = self.log_path(name).open("ab")
        log.write(
            f"--- egret portal stack: starting {name} at {time.strftime('%Y-%m-%dT%H:%M:%S')}\n".encode()
        )
        log.flush()
        popen = subprocess.Popen(
            argv,
            cwd=self.cluster.cwd,
            env=env
            if env is not None
            else {k: v for k, v in os.environ.items() if not k.startswith("EGRET_")},
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # a Ctrl-C reaches it only as stop()'s SIGTERM
        )
        self._processes[name] = _Process(popen, log)
        atexit.register(self.stop)

    def _wait(self, name: str, url: str, answered: Callable[[httpx.Response], bool]) -> None:
        """Poll `url` until `answered`; fail early with the log tail if the process exits."""
        deadline = time.monotonic() + self._start_timeout_s
        while True:
            if not self.is_running(name):
                raise ClusterError(f"{name} exited while starting\n{self.log_tail(name)}")
            try:
                if answered(httpx.get(url, timeout=1.0)):
                    return
            except httpx.HTTPError:
                pass  # not listening yet: poll again until the deadline
            if time.monotonic() > deadline:
                raise ClusterError(
                    f"no answer from {url} after {self._start_timeout_s:.0f} s\n{self.log_tail(name)}"
                )
            time.sleep(0.1)

    def is_running(self, name: str) -> bool:
        process = self._processes.get(name)
        return process is not None and process.popen.poll() is None

    def pid(self, name: str) -> int:
        """`name` is "portal" or "oidc-provider" (as Cluster.pid for the services)."""
        return self._processes[name].popen.pid

    def stop(self) -> dict[str, int]:
        """SIGTERM the portal, then the provider; SIGKILL what is left; return exit codes."""
        codes: dict[str, int] = {}
        for name in ("portal", "oidc-provider"):
            process = self._processes.pop(name, None)
            if process is None:
                continue
            if process.popen.poll() is None:
                process.popen.send_signal(signal.SIGTERM)
            try:
                process.popen.wait(timeout=10.0)
            except subprocess.TimeoutExpired:
                process.popen.kill()
                process.popen.wait()
            process.log.close()
            codes[name] = process.popen.returncode
        atexit.unregister(self.stop)
        return codes

    def __enter__(self) -> PortalStack:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # -- observation -------------------------------------------------------------------

    def log_tail(self, name: str, lines: int = 40) -> str:
        path = self.log_path(name)
        if not path.exists():
            return f"({path} does not exist)"
        tail = path.read_bytes()[-64 * 1024 :].decode(errors="replace").splitlines()[-lines:]
        return f"--- last {len(tail)} lines of {path}:\n" + "\n".join(tail)
