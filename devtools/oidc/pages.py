"""The provider's few HTML pages: sign in, an error that cannot go back to the client, and
signed out. Plain server-rendered forms; every value is escaped by Jinja's autoescape."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jinja2
from starlette.responses import HTMLResponse

from devtools.oidc.config import Account

_BASE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{% block title %}{% endblock %} - Egret local identity provider</title>
<style>
body { font-family: system-ui, sans-serif; max-width: 40rem; margin: 2rem auto; padding: 0 1rem; }
p, li, label { line-height: 1.5; }
.banner { background: #fff7bf; border-left: 5px solid #b58800; padding: .5rem 1rem; }
.error-summary { border: 5px solid #d4351c; padding: 1rem; margin-bottom: 1.5rem; }
.error { color: #d4351c; font-weight: bold; }
.hint { color: #505a5f; margin: 0 0 .5rem; }
fieldset { border: 0; padding: 0; margin: 0 0 1.5rem; }
legend, label[for=password] { font-weight: bold; }
.choice { margin: .5rem 0; }
input[type=password] { display: block; font-size: 1.1rem; padding: .3rem; margin-bottom: 1.5rem; }
button { font-size: 1.1rem; padding: .4rem 1rem; margin-right: 1rem; }
:focus { outline: 3px solid #fd0; }
</style>
</head>
<body>
<p class="banner">Local development identity provider: sample accounts only, never real people.</p>
<main>{% block main %}{% endblock %}</main>
</body>
</html>
"""

_SIGN_IN = """{% extends "base" %}
{% block title %}{% if errors %}Error: {% endif %}Sign in{% endblock %}
{% block main %}
{% if errors %}
<div class="error-summary" role="alert" aria-labelledby="error-summary-title" tabindex="-1">
<h2 id="error-summary-title">There is a problem</h2>
<ul>{% for error in errors %}<li><a href="#{{ error.field }}">{{ error.message }}</a></li>{% endfor %}</ul>
</div>
{% endif %}
<h1>Sign in to {{ client_id }}</h1>
<form method="post" action="{{ action }}" novalidate>
<input type="hidden" name="transaction" value="{{ transaction }}">
<fieldset>
<legend>Account</legend>
{% for choice in choices %}
<div class="choice">
<input type="radio" id="{{ choice.id }}" name="account" value="{{ choice.username }}"
  aria-describedby="{{ choice.id }}-hint"{% if choice.checked %} checked{% endif %}>
<label for="{{ choice.id }}">{{ choice.label }}</label>
<p class="hint" id="{{ choice.id }}-hint">{{ choice.hint }}</p>
</div>
{% endfor %}
</fieldset>
<label for="password">Password</label>
{% if password_hint %}<p class="hint" id="password-hint">{{ password_hint }}</p>{% endif %}
<input type="password" id="password" name="password" autocomplete="current-password"
  {%- if password_hint %} aria-describedby="password-hint"{% endif %}>
<button type="submit" name="action" value="sign-in">Sign in</button>
<button type="submit" name="action" value="cancel">Cancel</button>
</form>
{% endblock %}
"""

_MESSAGE = """{% extends "base" %}
{% block title %}{{ title }}{% endblock %}
{% block main %}
<h1>{{ title }}</h1>
<p>{{ message }}</p>
{% endblock %}
"""

_TEMPLATES = jinja2.Environment(
    loader=jinja2.DictLoader({"base": _BASE, "sign_in": _SIGN_IN, "message": _MESSAGE}),
    autoescape=True,
    undefined=jinja2.StrictUndefined,
)
# No script, no framing (a sign-in form inside another site's frame is a clickjacking trap).
_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; frame-ancestors 'none'",
    "Cache-Control": "no-store",
    "Referrer-Policy": "no-referrer",
}


@dataclass(frozen=True)
class FieldError:
    field: str
    message: str


def _render(name: str, status: int, **context: Any) -> HTMLResponse:
    return HTMLResponse(_TEMPLATES.get_template(name).render(**context), status, headers=_HEADERS)


def sign_in_page(
    *,
    action: str,
    transaction: str,
    client_id: str,
    accounts: tuple[Account, ...],
    selected: str | None = None,
    errors: tuple[FieldError, ...] = (),
) -> HTMLResponse:
    choices = [
        {
            # The first radio carries the field's id, where the error summary links to.
            "id": "account" if index == 0 else f"account-{index}",
            "username": account.username,
            "label": account.display_name,
            "hint": f"{account.username}: role {account.role.value}, {account.principal}",
            "checked": account.username == selected,
        }
        for index, account in enumerate(accounts)
    ]
    passwords = {account.password for account in accounts}
    password_hint = f"Every sample account's password is {passwords.pop()}." if len(passwords) == 1 else ""
    return _render(
        "sign_in",
        400 if errors else 200,
        action=action,
        transaction=transaction,
        client_id=client_id,
        choices=choices,
        password_hint=password_hint,
        errors=errors,
    )


def message_page(title: str, message: str, status: int = 200) -> HTMLResponse:
    return _render("message", status, title=title, message=message)
