"""Languages: Babel message catalogues (zh_Hans, the default, and en) and localised dates
and numbers.

The catalogues are `translations/<language>/LC_MESSAGES/messages.po`. A compiled `.mo`
beside a `.po` is used when it is at least as new (`python -m services.portal
compile-translations` writes them for an image); otherwise the `.po` is compiled in memory
at start-up with Babel, so a checkout runs without a build step. Message ids are English;
`en` therefore translates each to itself, and a test checks both catalogues are complete.
"""

from __future__ import annotations

import gettext
import io
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import date, datetime, tzinfo
from pathlib import Path
from zoneinfo import ZoneInfo

from babel import Locale
from babel.dates import format_date, format_datetime
from babel.messages.mofile import write_mo
from babel.messages.pofile import read_po
from babel.numbers import format_decimal

TRANSLATIONS = Path(__file__).parent / "translations"
DOMAIN = "messages"
LANGUAGES = ("zh_Hans", "en")
# How each language names itself on the switch.
NATIVE_NAMES = {"zh_Hans": "中文", "en": "English"}
# The lang attribute of each language's pages (BCP 47).
HTML_LANG = {"zh_Hans": "zh-Hans", "en": "en"}


def po_path(language: str, directory: Path = TRANSLATIONS) -> Path:
    return directory / language / "LC_MESSAGES" / f"{DOMAIN}.po"


def load_translations(language: str, directory: Path = TRANSLATIONS) -> gettext.GNUTranslations:
    po = po_path(language, directory)
    mo = po.with_suffix(".mo")
    if mo.is_file() and mo.stat().st_mtime >= po.stat().st_mtime:
        with mo.open("rb") as handle:
            return gettext.GNUTranslations(handle)
    return gettext.GNUTranslations(io.BytesIO(compile_po(po)))


def compile_po(po: Path) -> bytes:
    with po.open("rb") as handle:
        catalog = read_po(handle, locale=po.parent.parent.name)
    buffer = io.BytesIO()
    write_mo(buffer, catalog, use_fuzzy=False)
    return buffer.getvalue()


def compile_all(directory: Path = TRANSLATIONS) -> list[Path]:
    """Write every catalogue's .mo beside its .po (for images); returns what it wrote."""
    written = []
    for language in LANGUAGES:
        po = po_path(language, directory)
        mo = po.with_suffix(".mo")
        mo.write_bytes(compile_po(po))
        written.append(mo)
    return written


@dataclass(frozen=True)
class Localiser:
    """One language's words, dates and numbers. Pure: views take one to say things."""

    language: str
    translations: gettext.NullTranslations
    locale: Locale
    timezone: tzinfo

    def gettext(self, message: str, **values: object) -> str:
        text = self.translations.gettext(message)
        return text % values if values else text

    def ngettext(self, singular: str, plural: str, n: int, **values: object) -> str:
        text = self.translations.ngettext(singular, plural, n)
        return text % {"num": n, **values}

    def date(self, moment: datetime | date | None) -> str:
        if moment is None:
            return ""
        if isinstance(moment, datetime):
            moment = moment.astimezone(self.timezone).date()
        return str(format_date(moment, "long", locale=self.locale))

    def datetime(self, moment: datetime | None) -> str:
        if moment is None:
            return ""
        return str(format_datetime(moment, "medium", tzinfo=self.timezone, locale=self.locale))

    def number(self, value: int | float) -> str:
        return str(format_decimal(value, locale=self.locale))

    def signed(self, value: int) -> str:
        """Points with their sign: +10, U+2212 MINUS SIGN and 5, or 0."""
        if value > 0:
            return "+" + self.number(value)
        if value < 0:
            return "\u2212" + self.number(-value)
        return self.number(0)


def localisers(timezone: str = "Asia/Shanghai", directory: Path = TRANSLATIONS) -> Mapping[str, Localiser]:
    """A Localiser per language, built once at start-up."""
    zone = ZoneInfo(timezone)
    return {
        language: Localiser(language, load_translations(language, directory), Locale.parse(language), zone)
        for language in LANGUAGES
    }
