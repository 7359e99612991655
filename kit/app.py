"""The command line every service shares: `python -m services.<name> [serve|migrate|...]`.

Settings are read and validated before anything starts; a bad or missing value stops
start-up with every problem listed and exit status 2.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, TypeVar

from kit.admin import AdminServer, Readiness
from kit.audit import audit_keys, parse_anchor
from kit.audit_anchors import anchor_loop
from kit.audit_chain import AuditChainServicer
from kit.audit_chain import check as check_audit_chain
from kit.db import create_engine
from kit.db_metrics import statement_sample, time_statements
from kit.env import SettingsError
from kit.logging import configure_logging, get_logger
from kit.metrics import Reading, configure_metrics, gauge, meter
from kit.migrations import upgrade
from kit.pseudonym import Pseudonymiser
from kit.rekey import KeyedStore, StaleKeyGeneration, needs_rekey, rekey
from kit.security import certificate_expiry
from kit.server import BackgroundLoop, Service, serve
from kit.settings import CommonSettings
from kit.tracing import configure_tracing


class HasCommon(Protocol):
    @property
    def common(self) -> CommonSettings: ...


S = TypeVar("S", bound=HasCommon)


def migrate(common: CommonSettings, migrations_dir: Path) -> None:
    """Bring the service's database schema up to date."""
    engine = create_engine(common.database_url, sqlite=common.sqlite)
    try:
        upgrade(engine, migrations_dir, f"{common.service}_alembic_version")
    finally:
        engine.dispose()


def rekey_database(common: CommonSettings, store: KeyedStore, pseudonymiser: Pseudonymiser) -> int:
    """Move the database's stored subject keys to the current generation (kit.rekey)."""
    engine = create_engine(common.database_url, sqlite=common.sqlite)
    try:
        result = rekey(engine, store, pseudonymiser, audit_keys(common.audit))
    finally:
        engine.dispose()
    print(f"subject keys: generation {result.generation}, {result.moved} rows moved")
    return 0


def stored_generation_current(
    common: CommonSettings, store: KeyedStore, pseudonymiser: Pseudonymiser
) -> bool:
    engine = create_engine(common.database_url, read_only=True)
    try:
        return not needs_rekey(engine, store, pseudonymiser)
    finally:
        engine.dispose()


def verify_audit(common: CommonSettings, log: Any, head: Any, anchors: Sequence[tuple[int, str]] = ()) -> int:
    """Walk the service's audit chain under its keys and check `anchors` (seq, hash recorded
    elsewhere) and every automatic anchor in EGRET_AUDIT_ANCHOR_FILE; exit 0 when intact,
    printing the anchor to record next, 1 listing every break."""
    engine = create_engine(common.database_url, read_only=True)
    try:
        state = check_audit_chain(common, engine, log, head, anchors)
    finally:
        engine.dispose()
    report = state.report
    if state.intact:
        checked = f", {len(anchors)} anchor(s) hold" if anchors else ""
        if common.audit.anchor_file is not None:
            checked += f", {state.automatic} automatic anchor(s) in {common.audit.anchor_file} hold"
        print(f"egret-{common.service}: audit log intact ({report.records} records{checked})")
        if report.records:
            # Kept outside the database (a ticket, a notary, write-once storage), it lets a
            # later `verify-audit --anchor` catch a consistent rewrite of the whole log.
            print(f"anchor: {report.last_seq}:{report.last_hash}")
        return 0
    print(f"egret-{common.service}: audit log BROKEN ({report.records} records):", file=sys.stderr)
    for problem in state.problems:
        print(f"  {problem}", file=sys.stderr)
    return 1


def audit_anchors(common: CommonSettings, head: Any) -> BackgroundLoop:
    """The background loop appending the audit head to EGRET_AUDIT_ANCHOR_FILE, on its own
    small read-only engine (it must not wait behind the service's pool)."""
    assert common.audit.anchor_file is not None
    path = common.audit.anchor_file

    async def run(stopping: asyncio.Event) -> None:
        engine = create_engine(common.database_url, read_only=True, pool_size=1)
        try:
            await anchor_loop(
                stopping,
                engine=engine,
                head=head,
                service=common.service,
                path=path,
                interval_s=common.audit.anchor_interval_s,
            )
        finally:
            engine.dispose()

    return run


def export_certificate_expiry(common: CommonSettings) -> None:
    """egret_tls_certificate_not_after_seconds: when each certificate on disk expires, read
    again as rotation replaces the files (kit.security), for the expiring-soon alert."""

    def read() -> Reading:
        return {(("certificate", name),): at for name, at in certificate_expiry(common.security).items()}

    gauge(meter("egret.tls"), "egret.tls.certificate.not_after", read, unit="s", description="Expiry (unix)")


def _anchor(text: str) -> tuple[int, str]:
    try:
        return parse_anchor(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def run_cli(
    *,
    name: str,
    load_settings: Callable[[], S],
    build: Callable[[S], Service],
    migrations_dir: Path | None,
    commands: Mapping[str, tuple[str, Callable[[S], int]]] | None = None,
    audit: tuple[Any, Any] | None = None,
    keyed: tuple[KeyedStore, Callable[[S], Pseudonymiser]] | None = None,
    argv: Sequence[str] | None = None,
) -> int:
    """`audit` is the service's (AuditLog, AuditHead) models: adds `verify-audit`.
    `keyed` is what its database stores under subject keys and how its settings name the
    key chain: adds `rekey`, which `migrate` (and serving with EGRET_MIGRATE_ON_START) runs
    too, and keeps `serve` from starting on keys of another generation."""
    parser = argparse.ArgumentParser(prog=f"python -m services.{name}", description=f"Egret {name} service")
    sub = parser.add_subparsers(dest="command")
    sub.add_parser("serve", help="run the gRPC server (the default)")
    if migrations_dir is not None:
        sub.add_parser("migrate", help="apply database migrations and exit")
    if keyed is not None:
        sub.add_parser(
            "rekey",
            help="move stored subject keys to the current key generation (resumable, audited; "
            "instances of other generations answer UNAVAILABLE meanwhile)",
        )
    extra = dict(commands or {})
    for command, (help_text, _) in extra.items():
        sub.add_parser(command, help=help_text)
    if audit is not None:
        verify_parser = sub.add_parser(
            "verify-audit",
            help="verify the hash chain of the audit log; exit 1 on any altered, inserted or deleted "
            "record, or on a record that no longer matches an anchor",
        )
        verify_parser.add_argument(
            "--anchor",
            action="append",
            default=[],
            type=_anchor,
            metavar="SEQ:HASH",
            help="a head printed by an earlier verify-audit and kept outside the database (repeatable)",
        )
    args = parser.parse_args(argv)
    command = args.command or "serve"

    try:
        settings = load_settings()
    except SettingsError as exc:
        print(f"egret-{name}: {exc}", file=sys.stderr)
        return 2
    common = settings.common
    configure_logging(name, log_format=common.log_format, level=common.log_level)
    log = get_logger(f"services.{name}")

    try:
        if command == "migrate" and migrations_dir is not None:
            migrate(common, migrations_dir)
            log.info("migrated")
            return 0 if keyed is None else rekey_database(common, keyed[0], keyed[1](settings))
        if command == "rekey" and keyed is not None:
            return rekey_database(common, keyed[0], keyed[1](settings))
        if command in extra:
            return extra[command][1](settings)
        if command == "verify-audit" and audit is not None:
            return verify_audit(common, audit[0], audit[1], args.anchor)

        missing = common.security.missing() + ([] if common.security.insecure else common.audit.missing())
        if missing:
            print(f"egret-{name}: {SettingsError(missing)}", file=sys.stderr)
            return 2
        try:
            provider = configure_tracing(name)
            metrics = configure_metrics(name)
            if metrics is not None:
                time_statements(statement_sample())
        except SettingsError as exc:
            print(f"egret-{name}: {exc}", file=sys.stderr)
            return 2
        if common.migrate_on_start and migrations_dir is not None:
            migrate(common, migrations_dir)
            if keyed is not None:
                rekey_database(common, keyed[0], keyed[1](settings))
        elif keyed is not None and not stored_generation_current(common, keyed[0], keyed[1](settings)):
            generation = keyed[1](settings).current_key_id
            print(
                f"egret-{name}: stored subject keys are not of this instance's generation {generation!r}: "
                f"run `python -m services.{name} migrate` (or `rekey`) first",
                file=sys.stderr,
            )
            return 2

        async def build_and_serve() -> None:
            # Built inside the running loop: gRPC channels and asyncio objects bind to it.
            service = build(settings)
            if audit is not None:
                # Every service with an audit log serves its state (kit.server registers it).
                service.audit_chain = AuditChainServicer(common, *audit)
                service.background = [*service.background, service.audit_chain.verify_periodically]
                if common.audit.anchor_file is not None:
                    service.background = [*service.background, audit_anchors(common, audit[1])]
            export_certificate_expiry(common)
            readiness = Readiness()
            try:
                admin = AdminServer(
                    common.admin_address,
                    readiness=readiness,
                    loop=asyncio.get_running_loop(),
                    registry=metrics.registry if metrics is not None else None,
                )
            except OSError as exc:
                raise SettingsError([f"EGRET_ADMIN_ADDRESS={common.admin_address!r}: {exc}"]) from exc
            admin.start()
            try:
                await serve(common, service, tracer_provider=provider, readiness=readiness)
            finally:
                admin.stop()
                if metrics is not None:
                    metrics.shutdown()

        try:
            asyncio.run(build_and_serve())
        except SettingsError as exc:
            # A setting that contradicts the stored state (found while building) stops start-up
            # the same way as a bad value.
            print(f"egret-{name}: {exc}", file=sys.stderr)
            return 2
        return 0
    except StaleKeyGeneration as exc:
        # Settings of another key generation than the stored keys' (found before serving,
        # while building, or by a command): stop with the reason, as for a bad setting.
        print(f"egret-{name}: {exc}", file=sys.stderr)
        return 2
