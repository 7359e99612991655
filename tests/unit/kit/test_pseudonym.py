"""Canonical subject ids: one subject, one key, however its id was written (issue 12, 6)."""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import random
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from kit.env import Env
from kit.errors import Unauthenticated
from kit.principal import Role
from kit.pseudonym import (
    USCC_ALPHABET,
    CanonicalId,
    InvalidId,
    KeyLink,
    Pseudonymiser,
    UnknownKeyGeneration,
    canonical_value,
    check_subject,
    resident_id_check_character,
    subject_violations,
    uscc_check_character,
)
from kit.settings import PseudonymSettings
from kit.tokens import TokenVerifier, issue_token
from tests.support.events import full_width

PSEUDONYMS = Pseudonymiser(b"k" * 32, "k1")
# Valid check characters: GB 11643 (ISO 7064 MOD 11-2) and GB 32100.
RESIDENT = "35020019920202234X"
USCC = "91350211M000100Y46"


def key(kind: str, scheme: str, value: str) -> str:
    return PSEUDONYMS.subject_key(kind, scheme, value)


@pytest.mark.parametrize(
    "written",
    [
        "35020019920202234x",  # lower-case check character
        " 35020019920202234X ",
        "350200 19920202 234X",
        "3502-0019-9202-0223-4X",
        full_width(RESIDENT),  # typed with a CJK input method (NFKC)
    ],
)
def test_a_resident_id_has_one_key_however_it_is_written(written: str) -> None:
    assert subject_violations("person", "resident-id", written) == []
    assert key("person", "resident-id", written) == key("person", "resident-id", RESIDENT)
    assert key("person", " Resident-ID ", written) == key("person", "resident-id", RESIDENT)


def test_a_first_generation_resident_id_is_the_same_person_as_its_18_character_form() -> None:
    # 15 digits (1984): region, YYMMDD, sequence; widened by "19" and a check character.
    assert canonical_value("resident-id", "350200920202234") == RESIDENT
    assert key("person", "resident-id", "350200920202234") == key("person", "resident-id", RESIDENT)


def test_a_unified_social_credit_code_has_one_key_however_it_is_written() -> None:
    for written in ("91350211m000100y46", "91-350211-M000100Y4-6", full_width("91") + "350211M000100Y46"):
        assert key("organization", "uscc", written) == key("organization", "uscc", USCC)


def test_ids_that_do_not_change_under_canonicalisation_keep_their_keys() -> None:
    # The message hashed is unchanged for canonical ids, so existing keys stay valid.
    expected = hmac.new(
        b"k" * 32, f"person\x1fresident-id\x1f{RESIDENT}".encode(), hashlib.sha256
    ).hexdigest()
    assert key("person", "resident-id", RESIDENT) == expected


@pytest.mark.parametrize(
    ("kind", "scheme", "value", "expected"),
    [
        ("person", "resident-id", "350200199202022345", [("subject.id_value", "BAD_CHECK_CHARACTER")]),
        ("person", "resident-id", "35020019920202234", [("subject.id_value", "INVALID")]),
        ("person", "resident-id", "3502001992020223XX", [("subject.id_value", "INVALID")]),
        ("organization", "uscc", "91350211M000100Y47", [("subject.id_value", "BAD_CHECK_CHARACTER")]),
        ("organization", "uscc", "91350211M000100I46", [("subject.id_value", "INVALID")]),
        ("person", "passport", "E12", [("subject.id_value", "INVALID")]),
        ("person", "shoe-size", "42", [("subject.id_scheme", "INVALID")]),
        ("organization", "resident-id", RESIDENT, [("subject.id_scheme", "WRONG_KIND")]),
        ("person", "uscc", USCC, [("subject.id_scheme", "WRONG_KIND")]),
        (None, "resident-id", RESIDENT, [("subject.kind", "REQUIRED")]),
    ],
)
def test_an_id_its_scheme_refuses_is_a_violation_and_has_no_key(
    kind: str | None, scheme: str, value: str, expected: list[tuple[str, str]]
) -> None:
    assert [(v.field, v.reason) for v in subject_violations(kind, scheme, value)] == expected
    with pytest.raises(InvalidId):
        key(kind or "thing", scheme, value)


def test_a_passport_number_is_upper_cased_without_separators() -> None:
    assert key("person", "passport", "e-1234 567") == key("person", "passport", "E1234567")


SIGNING_KEY = ec.generate_private_key(ec.SECP256R1())


def subject_token(sub: str) -> str:
    return issue_token(
        SIGNING_KEY, issuer="idp", audience="egret", subject=sub, role=Role.SUBJECT, algorithm="ES256"
    )


@pytest.mark.parametrize("holds_key", [True, False])
def test_a_subject_token_names_its_subject_canonically(holds_key: bool) -> None:
    verifier = TokenVerifier(
        {None: SIGNING_KEY.public_key()},
        "idp",
        "egret",
        subject_key_of=PSEUDONYMS.subject_key if holds_key else None,
    )
    lower = verifier.verify(subject_token("person:resident-id:35020019920202234x"))
    assert lower.role is Role.SUBJECT
    if holds_key:
        assert lower.subject_key == key("person", "resident-id", RESIDENT)
    # Unknown kind or scheme, a kind the scheme does not name, a wrong check character:
    # refused whether or not the service holds the key.
    for sub in (
        "robot:resident-id:35020019920202234X",
        "person:shoe-size:42",
        "organization:resident-id:35020019920202234X",
        "person:resident-id:350200199202022345",
    ):
        with pytest.raises(Unauthenticated) as refused:
            verifier.verify(subject_token(sub))
        assert sub.rsplit(":", 1)[1] not in str(refused.value)


# Key rotation as a keyed chain (issue 12, point 7; docs/security.md).
K2 = KeyLink("k2", b"second-generation-secret-0123456789")
K3 = KeyLink("k3", b"third-generation-secret-01234567890")


def test_a_rotated_key_is_the_new_secret_applied_to_the_old_key() -> None:
    rotated = Pseudonymiser(b"k" * 32, "k1", (K2,))
    old = key("person", "resident-id", RESIDENT)
    current, previous = rotated.subject_keys("person", "resident-id", RESIDENT.lower())
    assert previous == old
    assert current == hmac.new(K2.secret, old.encode(), hashlib.sha256).hexdigest()
    assert rotated.subject_key("person", "resident-id", RESIDENT) == current
    assert (rotated.current_key_id, rotated.previous_key_id) == ("k2", "k1")
    assert (PSEUDONYMS.current_key_id, PSEUDONYMS.previous_key_id) == ("k1", None)
    assert PSEUDONYMS.subject_keys("person", "resident-id", RESIDENT) == (old,)


def test_stored_keys_move_to_the_current_generation_without_raw_ids_or_the_root_key() -> None:
    chain = Pseudonymiser(b"k" * 32, "k1", (K2, K3))
    # The job holds only the rotations' secrets: the root key is not needed to re-key.
    job = Pseudonymiser(b"", "k1", (K2, K3))
    v1 = key("person", "resident-id", RESIDENT)
    v2 = Pseudonymiser(b"k" * 32, "k1", (K2,)).subject_key("person", "resident-id", RESIDENT)
    v3 = chain.subject_key("person", "resident-id", RESIDENT)
    assert job.rekey(v1, "k1") == job.rekey(v2, "k2") == job.rekey(v3, "k3") == v3
    with pytest.raises(KeyError):
        job.rekey(v1, "k0")


def test_keys_in_flight_move_forward_and_an_unknown_generation_is_retried_later() -> None:
    # A receiver configured for k3 gets keys of any earlier generation from a sender's
    # outbox; one that predates rotation sends no key id. A generation it does not know
    # yet is UNAVAILABLE: the sender retries until the rotation reaches the receiver.
    chain = Pseudonymiser(b"k" * 32, "k1", (K2, K3))
    receiver = Pseudonymiser(b"", "k1", (K2, K3))
    ((_, v1), (_, v2), (_, v3)) = chain.generation_keys("person", "resident-id", RESIDENT)
    assert receiver.forward(v1, "k1") == receiver.forward(v2, "k2") == receiver.forward(v3, "k3") == v3
    assert receiver.forward(v3, "") == v3
    with pytest.raises(UnknownKeyGeneration) as raised:
        Pseudonymiser(b"", "k1", (K2,)).forward(v3, "k3")
    assert "k3" in str(raised.value)
    assert v3 not in str(raised.value)


def test_every_generation_key_is_found_by_raw_id_but_only_with_the_root_key() -> None:
    chain = Pseudonymiser(b"k" * 32, "k1", (K2, K3))
    keys = chain.generation_keys("person", "resident-id", RESIDENT)
    assert [key_id for key_id, _ in keys] == ["k1", "k2", "k3"]
    assert keys[0][1] == key("person", "resident-id", RESIDENT)
    assert chain.subject_keys("person", "resident-id", RESIDENT) == (keys[2][1], keys[1][1])
    with pytest.raises(RuntimeError):
        Pseudonymiser(b"", "k1", (K2,)).subject_key("person", "resident-id", RESIDENT)


def test_rotations_are_read_in_order_from_settings_and_bad_ones_are_refused(tmp_path: Path) -> None:
    root = "r" * 32
    listed = tmp_path / "rotations"
    listed.write_text(f"k2:{K2.secret.decode()}\nk3:{K3.secret.decode()}\n")
    env = Env({"EGRET_SUBJECT_KEY": root, "EGRET_SUBJECT_KEY_ROTATIONS_FILE": str(listed)})
    settings = PseudonymSettings.read(env)
    assert env.problems == []
    assert Pseudonymiser.from_settings(settings) == Pseudonymiser(root.encode(), "k1", (K2, K3))
    # Rules reads the chain without the root key.
    env = Env({"EGRET_SUBJECT_KEY_ROTATIONS": f"k2:{K2.secret.decode()}"})
    assert PseudonymSettings.read(env, root_required=False).key == b""
    assert env.problems == []
    for bad in ("k2:short", "k1:" + "s" * 32, "bad id:" + "s" * 32):
        env = Env({"EGRET_SUBJECT_KEY": root, "EGRET_SUBJECT_KEY_ROTATIONS": bad})
        PseudonymSettings.read(env)
        assert env.problems, bad


def _reference_resident_check(digits: str) -> str:
    """GB 11643's check character written plainly: ISO 7064 MOD 11-2, weights 2**(17-i) mod 11."""
    return "10X98765432"[sum(int(c) * (2 ** (17 - i) % 11) for i, c in enumerate(digits)) % 11]


def _reference_uscc_check(body: str) -> str:
    """GB 32100's check character written plainly: weights 3**i mod 31."""
    total = sum(USCC_ALPHABET.index(c) * (3**i % 31) for i, c in enumerate(body))
    return USCC_ALPHABET[(31 - total % 31) % 31]


@pytest.mark.parametrize("seed", range(5))
def test_check_characters_follow_their_standards(seed: int) -> None:
    rng = random.Random(seed)
    for _ in range(200):
        digits = "".join(rng.choice("0123456789") for _ in range(17))
        body = "".join(rng.choice(USCC_ALPHABET) for _ in range(17))
        assert resident_id_check_character(digits) == _reference_resident_check(digits)
        assert uscc_check_character(body) == _reference_uscc_check(body)


@pytest.mark.parametrize("body", ["3502001992020223", "350200199202022345", "3502001992020223A"])
def test_a_resident_id_body_of_the_wrong_length_or_digits_is_refused(body: str) -> None:
    with pytest.raises(ValueError):
        resident_id_check_character(body)


@pytest.mark.parametrize(
    ("kind", "scheme", "written", "canonical"),
    [
        ("person", "resident-id", "350200 19920202 234x", RESIDENT),
        ("person", " Resident-ID ", full_width(RESIDENT), RESIDENT),
        ("person", "resident-id", "350200920202234", RESIDENT),
        ("organization", "uscc", "91-350211-m000100y4-6", USCC),
        ("person", "passport", "e 1234-5678", "E12345678"),
    ],
)
def test_a_checked_subject_is_hashed_to_the_keys_of_its_raw_id(
    kind: str, scheme: str, written: str, canonical: str
) -> None:
    problems, subject = check_subject(kind, scheme, written)
    assert problems == []
    assert subject == CanonicalId(kind, scheme.strip().lower(), canonical)
    chain = Pseudonymiser(b"k" * 32, "k1", (KeyLink("k2", b"s" * 32),))
    assert chain.canonical_generation_keys(subject) == chain.generation_keys(kind, scheme, written)


@pytest.mark.parametrize(
    ("kind", "scheme", "value"),
    [
        (None, "resident-id", RESIDENT),
        ("organization", "resident-id", RESIDENT),
        ("person", "resident-id", "350200199202022345"),
        ("person", "nope", RESIDENT),
        ("person", "passport", " "),
    ],
)
def test_a_subject_with_violations_has_no_canonical_id(kind: str | None, scheme: str, value: str) -> None:
    problems, subject = check_subject(kind, scheme, value)
    assert problems
    assert subject is None
    assert problems == subject_violations(kind, scheme, value)


def test_a_canonical_id_never_shows_its_value() -> None:
    _, subject = check_subject("person", "resident-id", RESIDENT)
    assert RESIDENT not in repr(subject)
    assert RESIDENT not in str(subject)


def test_a_frozen_chain_names_its_own_generations_after_construction() -> None:
    root = Pseudonymiser(b"k" * 32, "k1")
    rotated = Pseudonymiser(b"k" * 32, "k1", (KeyLink("k2", b"s" * 32), KeyLink("k3", b"t" * 32)))
    assert root.generations == ("k1",)
    assert root.current_key_id == "k1"
    assert root.previous_key_id is None
    # Read twice: a value cached on first read stays this instance's own.
    for _ in range(2):
        assert rotated.generations == ("k1", "k2", "k3")
        assert rotated.current_key_id == "k3"
        assert rotated.previous_key_id == "k2"
        assert root.generations == ("k1",)
    with pytest.raises(dataclasses.FrozenInstanceError):
        rotated.key_id = "k9"  # type: ignore[misc]
    assert rotated == Pseudonymiser(b"k" * 32, "k1", rotated.rotations)
    assert rotated.rekey(rotated.generation_keys("person", "resident-id", RESIDENT)[0][1], "k1") == (
        rotated.subject_key("person", "resident-id", RESIDENT)
    )
