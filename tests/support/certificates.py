"""Reading certificates in tests."""

from __future__ import annotations

from cryptography import x509


def not_after(pem: bytes) -> float:
    return x509.load_pem_x509_certificate(pem).not_valid_after_utc.timestamp()
