"""`make run`: the four services on SQLite, the web portal and the local OpenID provider, a
synthetic city streamed through them, a summary.

    python -m devtools.demo [--subjects N] [--seed S] [--exit-after-summary] [--data-dir D]
                            [--portal-port 8080] [--provider-port 9400]

Starts the cluster in a fresh ./var/demo with the portal and the provider beside it
(devtools.portal_stack), streams the population through IngestService.StreamEvents (with
a few deliberately invalid events), waits until every accepted event has reached the
ledger, prints what happened, one subject's score, the portal's URL and the sample
accounts, then keeps serving until Ctrl-C so the portal can be used in a browser and the
services explored with the `egret` command and grpcurl (devtools.first_contact).
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import socket
import sys
import threading
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

import grpc
import sqlalchemy as sa
from tqdm import tqdm

from devtools.cluster import Cluster, ClusterError
from devtools.first_contact import print_first_contact, write_first_contact
from devtools.population import (
    Population,
    PopulationConfig,
    SyntheticSubject,
    batch_requests,
    expected_mean_events,
)
from devtools.portal_stack import PortalStack
from egret.common.v1 import outcome_pb2, subject_pb2
from egret.ingest.v1 import ingest_service_pb2
from egret.query.v1 import query_service_pb2, query_service_pb2_grpc
from egret_client.submitter import StreamFailed, StreamTotals, stream_by_source
from kit.db import create_engine
from kit.principal import Role

# Files a previous demo run leaves behind; only these are removed, never the whole directory.
_RUN_FILES = ("*.db", "*.db-wal", "*.db-shm", "*.db-journal", "*.log")
_TIER_ORDER = ("AAA", "AA", "A", "B", "C", "D")
# The services' documented ports (docs/configuration.md): ingest 50051 ... query 50054, and
# their admin ports (metrics and probes, kit.admin) 9461 ... 9464.
BASE_PORT = 50051
ADMIN_BASE_PORT = 9461
_SERVICES = ("ingest", "rules", "score", "query")
# The demo reads as a reviewer, who must state a purpose code (config/purposes.yaml).
DEMO_PURPOSE = "subject-request"


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m devtools.demo", description=__doc__.split("\n")[0])
    parser.add_argument("--subjects", type=int, default=10_000, help="synthetic subjects (default 10000)")
    parser.add_argument("--seed", type=int, default=1, help="population seed (default 1)")
    parser.add_argument("--data-dir", type=Path, default=Path("var/demo"), help="default ./var/demo")
    parser.add_argument("--batch-size", type=int, default=500, help="events per stream batch (default 500)")
    parser.add_argument(
        "--in-flight", type=int, default=4, help="batches awaiting acknowledgement (default 4)"
    )
    parser.add_argument("--invalid", type=int, default=6, help="deliberately invalid events (default 6)")
    parser.add_argument("--drain-timeout", type=float, default=900.0, help="seconds (default 900)")
    parser.add_argument(
        "--exit-after-summary",
        action="store_true",
        help="stop the services after the summary instead of serving",
    )
    parser.add_argument(
        "--base-port",
        type=int,
        default=BASE_PORT,
        help=f"ingest listens here, rules, score and query on the next three (default {BASE_PORT})",
    )
    parser.add_argument(
        "--portal-port", type=int, default=8080, help="the portal's port (default 8080, else a free one)"
    )
    parser.add_argument(
        "--provider-port",
        type=int,
        default=9400,
        help="the local OpenID provider's port (default 9400, else a free one)",
    )
    args = parser.parse_args(argv)
    if args.subjects < 1 or args.batch_size < 1 or args.in_flight < 1:
        parser.error("--subjects, --batch-size and --in-flight must be at least 1")
    return args


def _fresh_data_dir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    for pattern in _RUN_FILES:
        for stale in path.glob(pattern):
            stale.unlink()
    return path.resolve()


def _port_if_free(port: int) -> int:
    """`port` if nothing listens on it on loopback, else 0 (a free one)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            print(f"  port {port} is taken; using a free one")
            return 0
    return port


def _today() -> datetime:
    # Event times are relative to today so the ledger is current under the policy's
    # visibility periods; within a day the stream is fully reproducible from the seed.
    return datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)


async def _stream(
    cluster: Cluster, population: Population, args: argparse.Namespace, total: int | None
) -> StreamTotals:
    with tqdm(total=total, unit="ev", desc="streaming", dynamic_ncols=True) as bar:

        def on_ack(
            request: ingest_service_pb2.StreamEventsRequest,
            _response: ingest_service_pb2.StreamEventsResponse,
            _latency: float,
        ) -> None:
            bar.update(len(request.events))

        # One stream per department, each with its own token: a department submits only as itself.
        return await stream_by_source(
            cluster.department_channel,
            batch_requests(population.events(), batch_size=args.batch_size),
            in_flight=args.in_flight,
            on_ack=on_ack,
        )


def _tier_distribution(database_url: str) -> dict[str, int] | None:
    """Subjects per tier, read straight from score's database (read-only)."""
    engine = create_engine(database_url, read_only=True, pool_size=1)
    try:
        inspector = sa.inspect(engine)
        # score_subjects is the expected name; any table keeping a tier per subject will do.
        names = inspector.get_table_names()
        candidates = ["score_subjects"] + [n for n in names if n != "score_subjects"]
        for table in candidates:
            if table not in names:
                continue
            columns = {c["name"] for c in inspector.get_columns(table)}
            if {"tier", "subject_key"} <= columns:
                with engine.connect() as connection:
                    rows = connection.execute(
                        sa.text(f"SELECT tier, count(*) FROM {table} GROUP BY tier")
                    ).all()
                return {str(tier): int(count) for tier, count in rows}
        return None
    finally:
        engine.dispose()


def _print_tiers(tiers: dict[str, int] | None) -> None:
    if tiers is None:
        print("  (score's database has no table with a tier per subject)")
        return
    total = sum(tiers.values()) or 1
    ordered = [t for t in _TIER_ORDER if t in tiers] + sorted(set(tiers) - set(_TIER_ORDER))
    for tier in ordered:
        share = tiers[tier] / total
        print(f"  {tier:>4} {tiers[tier]:>8}  {share:6.1%}  {'#' * round(share * 50)}")


def _print_tiers_by_kind(cluster: Cluster) -> None:
    """Subjects per tier and per list for persons and organizations, as query reports them."""
    with cluster.sync_channel("query") as channel:
        stub = query_service_pb2_grpc.QueryServiceStub(channel)
        try:
            d = stub.GetTierDistribution(query_service_pb2.GetTierDistributionRequest(), timeout=30)
        except grpc.RpcError as exc:
            print(f"  query failed: {exc.code().name}: {exc.details()}")
            return
    for kind, label in (
        (subject_pb2.SUBJECT_KIND_PERSON, "persons"),
        (subject_pb2.SUBJECT_KIND_ORGANIZATION, "organizations"),
    ):
        tiers = {c.tier: c.subjects for c in d.by_kind if c.subject_kind == kind}
        lists = {c.list_name: c.subjects for c in d.lists if c.subject_kind == kind}
        print(
            f"\nTiers of {label} ({sum(tiers.values())} subjects;"
            f" red list {lists.get('red', 0)}, black list {lists.get('black', 0)})"
        )
        _print_tiers(tiers)


def _print_rejection(totals: StreamTotals) -> None:
    if not totals.rejections:
        return
    source, result = totals.rejections[0]
    print(f"\nOne rejection: event {result.event_id} from {source}: {result.message}")
    for violation in result.violations:
        print(f"  {violation.field}: {violation.reason}: {violation.description}")


def _print_subject(cluster: Cluster, subjects: Sequence[SyntheticSubject]) -> None:
    # Read as a reviewer of the credit office would.
    with cluster.sync_channel("query", cluster.token("demo-reviewer", Role.REVIEWER)) as channel:
        stub = query_service_pb2_grpc.QueryServiceStub(channel)
        for subject in subjects:
            ref = subject_pb2.SubjectRef(subject=subject.proto())
            try:
                score = stub.GetScore(
                    query_service_pb2.GetScoreRequest(subject=ref, purpose=DEMO_PURPOSE), timeout=10
                ).score
                entries = stub.ListEntries(
                    query_service_pb2.ListEntriesRequest(subject=ref, page_size=10, purpose=DEMO_PURPOSE),
                    timeout=10,
                ).entries
            except grpc.RpcError as exc:
                if exc.code() == grpc.StatusCode.NOT_FOUND:
                    continue
                print(f"  query failed: {exc.code().name}: {exc.details()}")
                return
            # The raw id is the user's own synthetic data, shown only here on their terminal.
            print(f"\nSample subject {subject.kind} {subject.id_scheme}:{subject.id_value}")
            print(f"  subject key {score.subject_key[:16]}...  policy {score.policy_version}")
            print(
                f"  score {score.score} (base {score.base_score}), tier {score.tier}, "
                f"{score.entry_count} counting entries"
            )
            for category in score.categories:
                print(
                    f"    {category.category:<14} {category.points:+5d} from {category.entry_count} entries"
                )
            print("  latest entries:")
            for entry in entries:
                status = (
                    query_service_pb2.EntryStatus.Name(entry.status).removeprefix("ENTRY_STATUS_").lower()
                )
                severity = outcome_pb2.Severity.Name(entry.severity).removeprefix("SEVERITY_").lower()
                print(
                    f"    {entry.occurred_at.ToDatetime():%Y-%m-%d} {entry.points:+4d} {entry.category:<12} "
                    f"{severity:<8} {status:<8} {entry.rule.rule_id}: {entry.reason}"
                )
            return
    print("\n  (none of the busiest subjects has a score yet)")


def _print_portal(stack: PortalStack) -> None:
    print(f"\nPortal: open {stack.url} in a browser and sign in (Chinese by default, English on every page)")
    print(
        f"  sign in at the local OpenID provider {stack.issuer}; "
        f"every sample account's password: {stack.password}"
    )
    for account in stack.accounts:
        print(f"  {account.username:<9} {account.role.value:<16} {account.display_name}")
    print(f"  logs: {stack.log_path('portal')}, {stack.log_path('oidc-provider')}")


def _serve_until_interrupted(cluster: Cluster, stack: PortalStack) -> None:
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    print("\nServing; Ctrl-C stops the portal, the provider and all four services.")
    print(f"Logs and databases: {cluster.data_dir}")
    while not stop.wait(1.0):
        for name in ("ingest", "rules", "score", "query"):
            if not cluster.is_running(name):
                print(f"{name} exited unexpectedly\n{cluster.log_tail(name)}", file=sys.stderr)
                return
        for name in ("portal", "oidc-provider"):
            if not stack.is_running(name):
                print(f"{name} exited unexpectedly\n{stack.log_tail(name)}", file=sys.stderr)
                return


def _interrupt(_signum: int, _frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse(argv)
    # A SIGTERM (from a supervisor or `timeout`) must stop the services too, not orphan them.
    signal.signal(signal.SIGTERM, _interrupt)
    status = 0
    data_dir = _fresh_data_dir(args.data_dir)
    config = PopulationConfig(
        subjects=args.subjects, seed=args.seed, now=_today(), invalid_events=args.invalid
    )
    population = Population(config)
    # Counting first costs a second per ~40k events and gives the progress bar a true total.
    total = (
        sum(1 for _ in population.generate())
        if args.subjects <= 100_000
        else round(args.subjects * expected_mean_events(config))
    )
    print(f"Starting ingest, rules, score and query in {data_dir} ...")
    ports = {name: _port_if_free(args.base_port + offset) for offset, name in enumerate(_SERVICES)}
    admin_ports = {name: _port_if_free(ADMIN_BASE_PORT + offset) for offset, name in enumerate(_SERVICES)}
    cluster = Cluster(data_dir, log_format="json", ports=ports, admin_ports=admin_ports)
    # Before the services start: they must trust the provider's tokens from the first.
    stack = PortalStack(
        cluster,
        portal_port=_port_if_free(args.portal_port),
        provider_port=_port_if_free(args.provider_port),
    )
    try:
        cluster.start()
        for name in _SERVICES:
            print(f"  {name:<7} {cluster.address(name)}  metrics {cluster.admin_url(name)}/metrics")
        first_contact = write_first_contact(cluster, data_dir)
        print("Starting the local OpenID provider and the portal ...")
        stack.start()
        print(f"  portal  {stack.url}\n  OpenID  {stack.issuer}")
        print(f"Streaming {total} events about {args.subjects} synthetic subjects (seed {args.seed})")
        totals = asyncio.run(_stream(cluster, population, args, total))
        print("Waiting for rules and score to catch up ...")
        cluster.wait_drained(timeout_s=args.drain_timeout)
        assert totals.first_send_at is not None
        end_to_end_s = time.perf_counter() - totals.first_send_at

        print("\nSummary")
        print(
            f"  events {totals.events}: accepted {totals.accepted}, duplicate {totals.duplicate}, "
            f"rejected {totals.rejected}, conflict {totals.conflict}"
        )
        print(
            f"  batches {totals.batches} "
            f"(resent {totals.resent_batches} after {totals.stream_errors} stream errors)"
        )
        print(
            f"  ingest {totals.events / max(totals.elapsed_s, 1e-9):,.0f} events/s "
            f"({totals.elapsed_s:.1f}s to last acknowledgement); end to end "
            f"{totals.events / end_to_end_s:,.0f} events/s ({end_to_end_s:.1f}s to drained)"
        )
        print("\nTiers")
        _print_tiers(_tier_distribution(cluster.database_url("score")))
        _print_tiers_by_kind(cluster)
        _print_rejection(totals)
        _print_subject(cluster, population.busiest_subjects(10))
        _print_portal(stack)
        print_first_contact(first_contact)
        if not args.exit_after_summary:
            _serve_until_interrupted(cluster, stack)
    except (ClusterError, StreamFailed) as exc:
        print(f"demo failed: {exc}", file=sys.stderr)
        status = 1
    except KeyboardInterrupt:
        print("\ninterrupted")
    finally:
        print("Stopping the portal, the provider and the services ...")
        codes = {**stack.stop(), **cluster.stop()}
        bad = {name: code for name, code in codes.items() if code not in (0, -signal.SIGTERM)}
        if bad:
            print(f"  unclean exits: {bad}; see the logs in {data_dir}", file=sys.stderr)
            status = 1
    return status


if __name__ == "__main__":
    sys.exit(main())
