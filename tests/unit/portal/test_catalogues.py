"""Both message catalogues are complete: every message the portal says is translated in
zh_Hans and en, and no catalogue holds a message the code no longer says."""

from __future__ import annotations

import re
from pathlib import Path

from babel.messages.extract import extract_from_dir
from babel.messages.pofile import read_po

from services.portal import i18n

PORTAL = Path(i18n.__file__).parent
METHODS = [
    ("**.py", "python"),
    ("templates/**.html", "jinja2"),
]
OPTIONS = {
    "templates/**.html": {"extensions": "jinja2.ext.i18n", "trim_blocks": "true", "lstrip_blocks": "true"}
}


def _said() -> set[str]:
    """Every message id in the portal's code and templates, as pybabel extract finds them."""
    found = set()
    for _, _, message, _, _ in extract_from_dir(
        str(PORTAL), METHODS, options_map=OPTIONS, keywords={"_": None, "gettext": None, "ngettext": (1, 2)}
    ):
        found.add(message[0] if isinstance(message, tuple) else message)
    return found


def _catalogue(language: str) -> dict[str, object]:
    with i18n.po_path(language).open("rb") as handle:
        catalog = read_po(handle, locale=language)
    return {str(m.id[0] if isinstance(m.id, tuple | list) else m.id): m for m in catalog if m.id}


def test_every_message_is_translated_in_both_languages() -> None:
    for language in i18n.LANGUAGES:
        catalogue = _catalogue(language)
        untranslated = [
            key
            for key, message in catalogue.items()
            if not message.string  # type: ignore[attr-defined]
            or (isinstance(message.string, tuple) and not all(message.string))  # type: ignore[attr-defined]
            or message.fuzzy  # type: ignore[attr-defined]
        ]
        assert untranslated == [], (language, untranslated[:10])


def test_the_catalogues_hold_exactly_what_the_portal_says() -> None:
    said = _said()
    assert len(said) > 200
    for language in i18n.LANGUAGES:
        held = set(_catalogue(language))
        assert sorted(said - held) == [], f"{language}: run pybabel extract and update (docs/portal.md)"
        assert sorted(held - said) == [], f"{language}: obsolete messages"


def test_placeholders_survive_translation() -> None:
    placeholder = re.compile(r"%\((\w+)\)s")
    for language in i18n.LANGUAGES:
        for key, message in _catalogue(language).items():
            strings = message.string if isinstance(message.string, tuple) else (message.string,)  # type: ignore[attr-defined]
            for string in strings:
                assert set(placeholder.findall(string)) <= set(placeholder.findall(key)) | {"num"}, (
                    language,
                    key,
                )


def test_the_catalogues_compile_and_translate(tmp_path: Path) -> None:
    zh = i18n.load_translations("zh_Hans")
    assert zh.gettext("My credit") == "我的信用"
    assert i18n.load_translations("en").gettext("My credit") == "My credit"
    assert i18n.compile_po(i18n.po_path("zh_Hans"))[:4] in (b"\xde\x12\x04\x95", b"\x95\x04\x12\xde")
