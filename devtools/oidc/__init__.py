"""A local OpenID provider for development and tests: run it with `python -m devtools.oidc_provider`
(see devtools/oidc_provider.py)."""
