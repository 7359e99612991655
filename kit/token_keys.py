"""Where a trusted issuer's token-verification keys come from, kept current while serving.

A PEM public key or a JWKS document on disk is read again when its file changes
(kit.filewatch); a JWKS URL is fetched with PyJWT's PyJWKClient, again once its cached
copy is older than the lifespan, and once (at most every REFETCH_EVERY_S) when a token
names a key id it does not hold, which is how a newly published key is found. A fetch or
a file that fails keeps the last good keys. docs/security.md, "Rotation without restart".
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlparse

import jwt
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from kit.filewatch import FileWatch
from kit.logging import get_logger

log = get_logger(__name__)

# An unknown key id makes one fetch at most this often, however many tokens name one:
# a caller sending made-up key ids cannot make the service hammer the identity provider.
REFETCH_EVERY_S = 10.0
FETCH_TIMEOUT_S = 5.0
_LOCAL_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})


class KeySource(Protocol):
    def key(self, kid: str | None) -> Any | None:
        """The key with id `kid` (None: the key for tokens naming no known id), or None."""

    def generation(self) -> int:
        """Changes whenever the keys change (a verifier forgets what it verified with the old)."""


class StaticKeys:
    """Keys fixed for the process's life (tests, and keys handed over in code)."""

    def __init__(self, keys: Mapping[str | None, Any]) -> None:
        self._keys = dict(keys)

    def key(self, kid: str | None) -> Any | None:
        return self._keys.get(kid)

    def generation(self) -> int:
        return 0


def parse_keys(pem: bytes | None = None, jwks: bytes | None = None) -> dict[str | None, Any]:
    """Verification keys by key id (None: the PEM key, for tokens without a known `kid`)."""
    keys: dict[str | None, Any] = {}
    if jwks is not None:
        for key in jwt.PyJWKSet.from_json(jwks.decode()).keys:
            keys[key.key_id] = key.key
    if pem is not None:
        # Loaded here to check it (a bad PEM never replaces a good one); PyJWT is handed the
        # PEM itself, which it prepares for the token's algorithm or refuses.
        load_pem_public_key(pem)
        keys[None] = pem
    return keys


class FileKeys:
    """A PEM public key and/or a JWKS document on disk, read again when they change."""

    def __init__(self, public_key_file: Path | None, jwks_file: Path | None, *, what: str) -> None:
        paths = [p for p in (jwks_file, public_key_file) if p is not None]
        has_jwks = jwks_file is not None

        def parse(contents: list[bytes]) -> dict[str | None, Any]:
            jwks = contents[0] if has_jwks else None
            pem = contents[-1] if public_key_file is not None else None
            keys = parse_keys(pem, jwks)
            if not keys:
                raise ValueError("no keys")
            return keys

        self._watch = FileWatch(paths, parse, what=what)

    def key(self, kid: str | None) -> Any | None:
        return self._watch.get().get(kid)

    def generation(self) -> int:
        return self._watch.generation


def check_jwks_url(url: str) -> str | None:
    """Why `url` may not be a JWKS URL, or None: https only (http to this host, for tests)."""
    parts = urlparse(url)
    if parts.scheme == "https" and parts.hostname:
        return None
    if parts.scheme == "http" and parts.hostname in _LOCAL_HOSTS:
        return None
    return "is not an https URL (http only to 127.0.0.1 or localhost)"


class RemoteJwks:
    """A JWKS document served by the identity provider.

    PyJWKClient fetches and parses it; the last good keys are held here rather than in
    PyJWKClient's own cache, because that cache forgets them when it expires and then
    fetches again on every lookup while the provider is down. A refresh after the lifespan
    runs on a thread of its own, so no call waits for it; only a token naming an unknown
    key id waits for a fetch (at most FETCH_TIMEOUT_S, at most every REFETCH_EVERY_S).
    """

    def __init__(
        self,
        url: str,
        *,
        lifespan_s: float,
        what: str,
        refetch_every_s: float = REFETCH_EVERY_S,
        timeout_s: float = FETCH_TIMEOUT_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        problem = check_jwks_url(url)
        if problem is not None:
            raise ValueError(f"JWKS URL {url!r} {problem}")
        self._client = jwt.PyJWKClient(url, cache_jwk_set=False, timeout=timeout_s)
        self._url = url
        self._what = what
        self._lifespan_s = lifespan_s
        self._refetch_every_s = refetch_every_s
        self._clock = clock
        self._lock = threading.Lock()
        self._keys: dict[str, Any] = {}
        self._document: str | None = None
        self._generation = 0
        self._refreshing = False
        # When the last fetch was tried and when an unknown key id last made one.
        self._tried = -float("inf")
        self._refetched = -float("inf")
        # A provider that is down at start does not stop the service: its tokens are refused
        # until a fetch succeeds (the unknown-key path retries).
        self._fetch()

    def key(self, kid: str | None) -> Any | None:
        if kid is None:
            return None
        now = self._clock()
        if now - self._tried >= self._lifespan_s:
            self._refresh_in_background()
        found = self._keys.get(kid)
        if found is None and now - self._refetched >= self._refetch_every_s:
            self._refetched = now
            self._fetch()
            found = self._keys.get(kid)
        return found

    def generation(self) -> int:
        if self._clock() - self._tried >= self._lifespan_s:
            self._refresh_in_background()
        return self._generation

    def _refresh_in_background(self) -> None:
        with self._lock:
            if self._refreshing:
                return
            self._refreshing = True
        threading.Thread(target=self._fetch, name="jwks-refresh", daemon=True).start()

    def _fetch(self) -> None:
        with self._lock:
            self._tried = self._clock()
        try:
            document = self._client.fetch_data()
            keys = {key.key_id: key.key for key in jwt.PyJWKSet.from_dict(document).keys if key.key_id}
        except (jwt.PyJWKClientError, jwt.PyJWKSetError, jwt.InvalidKeyError, ValueError) as exc:
            log.warning(
                "JWKS fetch failed; keeping the last good keys",
                what=self._what,
                url=self._url,
                error=f"{type(exc).__name__}: {exc}",
            )
            return
        finally:
            with self._lock:
                self._refreshing = False
        text = json.dumps(document, sort_keys=True)
        with self._lock:
            if text == self._document:
                return
            self._keys, self._document = keys, text
            self._generation += 1
        log.info("JWKS fetched", what=self._what, url=self._url, key_ids=sorted(keys))


class KeySet:
    """All of one issuer's key sources: a token's key id is looked up in each in turn, and a
    token whose id none holds is checked against the PEM key, if there is one."""

    def __init__(self, sources: Sequence[KeySource]) -> None:
        self._sources = tuple(sources)

    def key(self, kid: str | None) -> Any | None:
        if kid is not None:
            for source in self._sources:
                found = source.key(kid)
                if found is not None:
                    return found
        for source in self._sources:
            found = source.key(None)
            if found is not None:
                return found
        return None

    def generation(self) -> int:
        # Each source's generation only grows, so the sum changes whenever one does.
        return sum(source.generation() for source in self._sources)


def issuer_keys(
    *,
    what: str,
    public_key_file: Path | None = None,
    jwks_file: Path | None = None,
    jwks_url: str | None = None,
    jwks_lifespan_s: float = 300.0,
) -> KeySet:
    """The keys of one issuer from its configured files and URL."""
    sources: list[KeySource] = []
    if public_key_file is not None or jwks_file is not None:
        sources.append(FileKeys(public_key_file, jwks_file, what=what))
    if jwks_url is not None:
        sources.append(RemoteJwks(jwks_url, lifespan_s=jwks_lifespan_s, what=what))
    if not sources:
        raise ValueError("token verification needs a public key file, a JWKS file or a JWKS URL")
    return KeySet(sources)
