"""`egret dev token`: a token for any role, signed with a local cluster's development key.

Only for a profile marked `local: true` whose endpoints are all on loopback, and only in
an Egret checkout (the signing helper is Egret's own kit.tokens): production tokens come
from the city's identity provider, never from this command.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Annotated

import typer

from egret_client.cli.common import Exit, fail, state
from egret_client.cli.output import Format, emit, out
from egret_client.profile import Profile, ProfileError

app = typer.Typer(help="Local development clusters only.", no_args_is_help=True)

ROLES = ("department", "subject", "reviewer", "auditor", "benefit_provider", "admin")


def _loopback(address: str) -> bool:
    host = address.rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _local_signer(profile: Profile) -> Path:
    remote = [address for address in profile.endpoints.values() if not _loopback(address)]
    if not profile.local or remote or profile.dev is None:
        why = (
            f"its endpoints {', '.join(remote)} are not on this machine"
            if remote
            else "it is not marked `local: true` with a `dev` signing key"
        )
        raise fail(
            f"profile {profile.name!r} is not a local cluster ({why}); tokens for a real "
            "deployment come from its identity provider",
            Exit.CONFIG,
        )
    return profile.dev.signing_key


@app.command()
def token(
    ctx: typer.Context,
    role: Annotated[str, typer.Option("--role", "-r", help=f"One of {', '.join(ROLES)}.")],
    subject: Annotated[
        str | None,
        typer.Option(
            "--subject",
            "-s",
            help="The token's subject claim: a department id, a staff id, or for a subject "
            "KIND:SCHEME:VALUE (person:resident-id:…). Default: <role>-dev.",
        ),
    ] = None,
    lifetime: Annotated[
        float, typer.Option("--lifetime", help="Seconds; services accept at most 86400 by default.")
    ] = 3600.0,
    write: Annotated[
        Path | None, typer.Option("--write", "-w", help="Write the token to this file (mode 600).")
    ] = None,
) -> None:
    """Mint a token for ROLE, signed with the local cluster's development key."""
    settings = state(ctx)
    if role not in ROLES:
        raise fail(f"--role must be one of {', '.join(ROLES)}", Exit.USAGE)
    try:
        profile = settings.profile
    except ProfileError as exc:
        raise fail(str(exc), Exit.CONFIG) from None
    signing_key = _local_signer(profile)
    assert profile.dev is not None
    try:
        # Egret's own signer: the claims every service checks (docs/integrators.md, "Tokens").
        from cryptography.hazmat.primitives import serialization  # noqa: PLC0415

        from kit.principal import Role  # noqa: PLC0415
        from kit.tokens import issue_token  # noqa: PLC0415
    except ImportError:
        raise fail(
            "egret dev token works in an Egret checkout (it signs with kit.tokens)", Exit.CONFIG
        ) from None
    try:
        key = serialization.load_pem_private_key(signing_key.read_bytes(), None)
    except (OSError, ValueError) as exc:
        raise fail(f"cannot read the signing key {signing_key}: {exc}", Exit.CONFIG) from None
    minted = issue_token(
        key,
        issuer=profile.dev.issuer,
        audience=profile.dev.audience,
        subject=subject or f"{role}-dev",
        role=Role(role),
        lifetime_s=lifetime,
    )
    if write is not None:
        write.write_text(minted + "\n", encoding="utf-8")
        write.chmod(0o600)
    if settings.output is Format.TABLE:
        if write is None:
            out.print(minted, highlight=False, soft_wrap=True)
        else:
            out.print(f"wrote a {role} token to {write}", highlight=False)
        return
    emit(settings.output, {"role": role, "subject": subject or f"{role}-dev", "token": minted})
