"""`egret profile list|show`: what the config file holds and which profile is in use."""

from __future__ import annotations

import typer

from egret_client.cli.common import Exit, fail, state
from egret_client.cli.output import emit, fields
from egret_client.profile import ProfileError, config_path, profile_names

app = typer.Typer(help="The profiles of the config file.", no_args_is_help=True)


@app.command("list")
def list_profiles(ctx: typer.Context) -> None:
    """The profiles, the current one marked."""
    settings = state(ctx)
    try:
        names, current = profile_names(settings.config)
    except ProfileError as exc:
        raise fail(str(exc), Exit.CONFIG) from None
    chosen = settings.profile_name or current
    emit(
        settings.output,
        {"config": str(config_path(settings.config)), "current": chosen, "profiles": names},
        columns=("", "profile"),
        rows=(("*" if name == chosen else "", name) for name in names),
    )


@app.command("show")
def show(ctx: typer.Context) -> None:
    """The profile in use: endpoints, TLS files, where the token comes from."""
    settings = state(ctx)
    try:
        profile = settings.profile
    except ProfileError as exc:
        raise fail(str(exc), Exit.CONFIG) from None
    token = (
        f"client credentials at {profile.oidc.token_url}"
        if profile.oidc
        else str(profile.token_file or "none")
    )
    data = {
        "name": profile.name,
        "endpoints": dict(profile.endpoints),
        "ca": str(profile.ca_file or ""),
        "cert": str(profile.cert_file or ""),
        "token": token,
        "purpose": profile.purpose,
        "local": profile.local,
    }
    if settings.output.value != "table":
        emit(settings.output, data)
        return
    fields(
        [
            ("profile", profile.name),
            *((f"endpoint {name}", address) for name, address in profile.endpoints.items()),
            ("ca", data["ca"]),
            ("client certificate", data["cert"]),
            ("token", token),
            ("default purpose", profile.purpose),
            ("local cluster", "yes" if profile.local else "no"),
        ]
    )
