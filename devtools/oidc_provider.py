"""A local OpenID provider for `make run` and the tests: people sign in to the portal with it
exactly as with the city's provider (authorization code flow with PKCE, state and nonce;
discovery, authorize, token, userinfo, JWKS and end-session endpoints), as one of the sample
accounts of devtools/oidc/config.py.

It signs with the local PKI's token key (devtools/localpki.py), under its own issuer
`http(s)://127.0.0.1:<port>`; its access tokens are JWTs for the services (aud `egret`,
`sub`, `role`, `scope`), which trust it as a further issuer (`verifier_env`). It serves on
loopback only: the sample accounts' password is printed on its sign-in page.

    python -m devtools.oidc_provider --port 9400 --pki-dir var/demo/pki \\
        --client-id egret-portal --client-secret-file var/demo/pki/portal-oidc.secret \\
        --redirect-uri http://127.0.0.1:8080/auth/callback \\
        --post-logout-redirect-uri http://127.0.0.1:8080/
"""

from __future__ import annotations

import argparse
import logging
import socket
import ssl
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import httpx
import uvicorn
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from devtools.oidc.app import create_app
from devtools.oidc.config import (
    DEFAULT_PASSWORD,
    SAMPLE_RESIDENT_ID,
    SAMPLE_USCC,
    Account,
    Client,
    ProviderConfig,
    sample_accounts,
)
from devtools.oidc.tokens import jwks
from kit.principal import Role

LOOPBACK = ("127.0.0.1", "::1", "localhost")
# The name services know the provider by in their settings (EGRET_JWT_LOCALOIDC_*).
VERIFIER_NAME = "LOCALOIDC"


def signing_key(pki_dir: Path) -> rsa.RSAPrivateKey:
    """The local PKI's token-signing key (devtools.localpki.create_local_pki writes it)."""
    key = serialization.load_pem_private_key((pki_dir / "jwt-private.pem").read_bytes(), None)
    if not isinstance(key, rsa.RSAPrivateKey):
        raise ValueError(f"{pki_dir / 'jwt-private.pem'} is not an RSA key")
    return key


def write_jwks(pki_dir: Path, path: Path) -> Path:
    """Write the JWKS document of the provider's key, for the services' EGRET_JWT_*_JWKS_FILE.
    It depends on the key only, so it can be written before the provider starts."""
    path.write_text(jwks(signing_key(pki_dir).public_key()))
    return path


def verifier_env(issuer: str, jwks_file: Path, name: str = VERIFIER_NAME) -> dict[str, str]:
    """The settings that make a service accept the provider's tokens, beside its own issuer's."""
    return {
        "EGRET_JWT_EXTRA_ISSUERS": name,
        f"EGRET_JWT_{name}_ISSUER": issuer,
        f"EGRET_JWT_{name}_JWKS_FILE": str(jwks_file),
    }


@dataclass(frozen=True)
class RunningProvider:
    config: ProviderConfig

    @property
    def issuer(self) -> str:
        return self.config.issuer

    def url(self, path: str) -> str:
        return self.issuer + path

    @property
    def discovery_url(self) -> str:
        return self.url("/.well-known/openid-configuration")


def _bind(host: str, port: int) -> socket.socket:
    if host not in LOOPBACK:
        raise ValueError(f"the local provider serves on loopback only, not {host!r}")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    return sock


def _server(config: ProviderConfig, tls: tuple[Path, Path] | None, *, log_level: str) -> uvicorn.Server:
    return uvicorn.Server(
        uvicorn.Config(
            create_app(config),
            lifespan="off",
            log_config=None,
            log_level=log_level,
            access_log=False,
            ssl_certfile=str(tls[0]) if tls else None,
            ssl_keyfile=str(tls[1]) if tls else None,
        )
    )


def _issuer(host: str, port: int, tls: bool) -> str:
    return f"{'https' if tls else 'http'}://{f'[{host}]' if ':' in host else host}:{port}"


@contextmanager
def running(
    pki_dir: Path,
    clients: Sequence[Client],
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    tls: tuple[Path, Path] | None = None,
    accounts: Sequence[Account] | None = None,
    start_timeout_s: float = 10.0,
    **options: Any,
) -> Iterator[RunningProvider]:
    """Serve the provider in a thread of this process until the block ends. Port 0 takes a
    free one; `tls` is (certificate chain, key) for https; `options` are further
    ProviderConfig fields (lifetimes, role_claim, subject_claim)."""
    sock = _bind(host, port)
    config = ProviderConfig(
        issuer=_issuer(host, sock.getsockname()[1], tls is not None),
        signing_key=signing_key(pki_dir),
        clients=tuple(clients),
        accounts=tuple(accounts) if accounts is not None else sample_accounts(),
        **options,
    )
    server = _server(config, tls, log_level="warning")
    thread = threading.Thread(
        target=server.run, kwargs={"sockets": [sock]}, name="oidc-provider", daemon=True
    )
    thread.start()
    try:
        deadline = time.monotonic() + start_timeout_s
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the local OpenID provider did not start")
            time.sleep(0.02)
        yield RunningProvider(config)
    finally:
        server.should_exit = True
        thread.join(timeout=10.0)
        sock.close()


def wait_ready(issuer: str, *, timeout_s: float = 15.0, ca_file: Path | None = None) -> None:
    """Wait until the provider at `issuer` serves its discovery document (e.g. after starting
    `python -m devtools.oidc_provider` as a process)."""
    verify: ssl.SSLContext | bool = ssl.create_default_context(cafile=str(ca_file)) if ca_file else True
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            response = httpx.get(f"{issuer}/.well-known/openid-configuration", verify=verify, timeout=1.0)
            if response.status_code == 200 and response.json().get("issuer") == issuer:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"no OpenID provider at {issuer} after {timeout_s:.0f} s")
        time.sleep(0.1)


def command(
    *,
    port: int,
    pki_dir: Path,
    client_id: str,
    client_secret_file: Path,
    redirect_uris: Sequence[str],
    post_logout_redirect_uris: Sequence[str] = (),
    python: str = sys.executable,
    extra: Sequence[str] = (),
) -> list[str]:
    """The command line that serves the provider as its own process."""
    argv = [python, "-m", "devtools.oidc_provider", "--port", str(port), "--pki-dir", str(pki_dir)]
    argv += ["--client-id", client_id, "--client-secret-file", str(client_secret_file)]
    for uri in redirect_uris:
        argv += ["--redirect-uri", uri]
    for uri in post_logout_redirect_uris:
        argv += ["--post-logout-redirect-uri", uri]
    return [*argv, *extra]


def _account(value: str) -> Account:
    username, role, principal, *name = value.split(",", 3)
    try:
        return Account(
            username.strip(), (name or [username])[0].strip(), Role(role.strip()), principal.strip()
        )
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m devtools.oidc_provider", description=(__doc__ or "").split("\n", 1)[0]
    )
    parser.add_argument("--port", type=int, required=True, help="port on loopback")
    parser.add_argument("--host", default="127.0.0.1", choices=LOOPBACK, help="default 127.0.0.1")
    parser.add_argument("--pki-dir", type=Path, required=True, help="the local PKI (its jwt-private.pem)")
    parser.add_argument(
        "--client-id", default="egret-portal", help="the registered client (default egret-portal)"
    )
    parser.add_argument(
        "--client-secret-file", type=Path, required=True, help="file holding the client secret"
    )
    parser.add_argument(
        "--redirect-uri", action="append", required=True, help="a registered redirect URI (repeat)"
    )
    parser.add_argument(
        "--post-logout-redirect-uri",
        action="append",
        default=[],
        help="where sign-out may return to (repeat)",
    )
    parser.add_argument("--tls-cert-file", type=Path, help="serve https with this certificate chain ...")
    parser.add_argument("--tls-key-file", type=Path, help="... and this key")
    parser.add_argument(
        "--password", default=DEFAULT_PASSWORD, help=f"sample accounts' password ({DEFAULT_PASSWORD})"
    )
    parser.add_argument("--resident-id", default=SAMPLE_RESIDENT_ID, help="the sample resident's id")
    parser.add_argument(
        "--uscc", default=SAMPLE_USCC, help="the sample business's unified social credit code"
    )
    parser.add_argument(
        "--account",
        type=_account,
        action="append",
        default=[],
        metavar="USERNAME,ROLE,PRINCIPAL[,NAME]",
        help="a further account (or one replacing a sample of that username), with --password",
    )
    parser.add_argument("--role-claim", default="role", help="claim carrying the role (default role)")
    parser.add_argument("--subject-claim", default="sub", help="claim carrying the subject (default sub)")
    parser.add_argument("--access-token-lifetime", type=int, default=900, help="seconds (default 900)")
    parser.add_argument("--write-jwks", type=Path, help="write the JWKS document here before serving")
    parser.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    args = parser.parse_args(argv)
    if (args.tls_cert_file is None) != (args.tls_key_file is None):
        parser.error("--tls-cert-file and --tls-key-file go together")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    accounts = {
        a.username: a
        for a in sample_accounts(password=args.password, resident_id=args.resident_id, uscc=args.uscc)
    }
    for account in args.account:
        accounts[account.username] = replace(account, password=args.password)
    client = Client(
        args.client_id,
        args.client_secret_file.read_text().strip(),
        tuple(args.redirect_uri),
        tuple(args.post_logout_redirect_uri),
    )
    tls = (args.tls_cert_file, args.tls_key_file) if args.tls_cert_file else None
    sock = _bind(args.host, args.port)
    config = ProviderConfig(
        issuer=_issuer(args.host, sock.getsockname()[1], tls is not None),
        signing_key=signing_key(args.pki_dir),
        clients=(client,),
        accounts=tuple(accounts.values()),
        role_claim=args.role_claim,
        subject_claim=args.subject_claim,
        access_token_lifetime_s=args.access_token_lifetime,
    )
    if args.write_jwks:
        write_jwks(args.pki_dir, args.write_jwks)
    print(f"local OpenID provider {config.issuer} (accounts: {', '.join(accounts)})", flush=True)
    _server(config, tls, log_level=args.log_level).run(sockets=[sock])
    return 0


if __name__ == "__main__":
    sys.exit(main())
