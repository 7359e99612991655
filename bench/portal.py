"""The portal's time per page at a fixed request rate, everything on this machine.

    python -m bench.portal [--subjects N] [--rate R] [--duration S] [--pages credit,entries,...]
                           [--residents K] [--json PATH]

Starts the four services, the local OpenID provider and the portal as processes
(devtools.cluster, devtools.portal_stack; TLS and tokens on, as in production), streams a
synthetic population through ingest (devtools.population, seed 1 and 10,000 subjects by
default, as `make run`) and waits until it is in the ledger. K residents of that
population then sign in through the real OpenID flow (authorization code, PKCE, state,
nonce; httpx plays the browser at the portal and at the provider): the sample resident
when the population holds them, then the persons with about as many events (or, with
--busiest, the persons with the most). For each page in turn the
bench requests it at R requests/s for S seconds after a warm-up, open loop, round-robin
over the residents, each with their own session, and reports per page:

- latency at the client, from each request's scheduled send time to its last byte (a
  client that falls behind is charged for it), p50 / p95 / p99 / max;
- the portal's own time from its Server-Timing header (`app;dur=`), p50 / p95 / p99;
- errors (anything but a 200, or no answer within 10 s);
- CPU seconds per request of each process (utime + stime from /proc/<pid>/stat over the
  measured seconds) and of this client;
- the load average before and after.

The target (issue 13) is the My credit page's p95 ≤ 150 ms with the services on the
same 2 cores.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import signal
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

from bench.meter import cpu_seconds, load_average, machine, percentile
from devtools.cluster import UNLIMITED, Cluster
from devtools.oidc.config import DEFAULT_PASSWORD, SAMPLE_RESIDENT_ID
from devtools.population import Origin, Population, PopulationConfig, batch_requests
from devtools.portal_stack import PortalStack
from egret_client.submitter import stream_by_source

TARGET_PAGE = "credit"
TARGET_P95_MS = 150.0
# Every main page: signed-in pages first, then public ones. "{entry}" is one of the
# signed-in resident's own entries (its explanation page).
PAGES = {
    "credit": "/credit",
    "entries": "/entries",
    "entry": "/entries/{entry}",
    "history": "/history",
    # The history page's chart image, which a browser fetches with the page.
    "chart": "/history/chart.svg",
    "benefits": "/benefits",
    "access": "/access",
    "contest": "/contest",
    "rules": "/rules",
    "tiers": "/tiers",
    "catalogue": "/catalogue",
}
REQUEST_TIMEOUT_S = 10.0
_ENTRY_LINK = re.compile(r'href="/entries/([0-9a-f]{32})"')
_SERVER_TIMING = re.compile(r"\bapp;dur=([0-9.]+)")


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.portal", description=__doc__.split("\n")[0])
    parser.add_argument("--subjects", type=int, default=10_000, help="synthetic subjects streamed first")
    parser.add_argument("--seed", type=int, default=1, help="population seed (1: the demo's city)")
    parser.add_argument("--rate", type=float, default=20.0, help="page requests per second")
    parser.add_argument("--duration", type=float, default=30.0, help="seconds measured per page")
    parser.add_argument("--warmup", type=float, default=3.0, help="seconds of unmeasured load per page first")
    parser.add_argument("--residents", type=int, default=4, help="residents signed in (round-robin)")
    parser.add_argument(
        "--busiest",
        action="store_true",
        help="sign in the busiest persons (the most entries) instead of residents like the sample one",
    )
    parser.add_argument(
        "--pages", default=",".join(PAGES), help=f"comma-separated, of {', '.join(PAGES)} (default: all)"
    )
    parser.add_argument("--drain-timeout", type=float, default=600.0, help="seconds to wait for the ledger")
    parser.add_argument("--data-dir", type=Path, help="keep logs and databases here (default: temporary)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    unknown = [p for p in args.pages.split(",") if p not in PAGES]
    if unknown:
        parser.error(f"unknown pages: {', '.join(unknown)}")
    if args.residents < 1 or args.rate <= 0 or args.duration <= 0:
        parser.error("--residents, --rate and --duration must be positive")
    return args


# -- the population and who signs in -------------------------------------------------------


def population(args: argparse.Namespace) -> tuple[list[Any], list[tuple[str, int]]]:
    """The stream's batches, and the residents who sign in as (resident id, events), built
    before any clock starts."""
    today = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    city = Population(PopulationConfig(subjects=args.subjects, seed=args.seed, now=today))
    events: list[tuple[str, Any]] = []
    counts: Counter[int] = Counter()
    for generated in city.generate():
        events.append((generated.source, generated.event))
        if generated.origin is Origin.ORIGINAL:
            counts[generated.subject_index] += 1
    persons = [
        (city.subject(i).id_value, n) for i, n in counts.most_common() if city.subject(i).kind == "person"
    ]
    if not persons:
        raise SystemExit("the population holds no person with events: raise --subjects")
    if not args.busiest:
        # Residents like the sample one (the demo's, 44 events with seed 1): a few of the
        # busiest have hundreds of entries, which Explain's cost grows with.
        sample = next((n for i, n in persons if i == SAMPLE_RESIDENT_ID), persons[0][1])
        persons.sort(key=lambda p: (p[0] != SAMPLE_RESIDENT_ID, abs(p[1] - sample)))
    return list(batch_requests(events, batch_size=500)), persons[: args.residents]


def resident_accounts(residents: Sequence[tuple[str, int]]) -> tuple[list[str], list[str]]:
    """Usernames and the provider's --account options: the first is its sample `resident`,
    the others are added as `resident2`, `resident3`, ..."""
    usernames = ["resident"]
    options: list[str] = []
    for number, (resident_id, _) in enumerate(residents[1:], start=2):
        usernames.append(f"resident{number}")
        options += ["--account", f"resident{number},subject,person:resident-id:{resident_id}"]
    return usernames, options


@dataclass
class Resident:
    username: str
    events: int
    portal: httpx.AsyncClient
    entry_id: str | None = None


async def sign_in(stack: PortalStack, username: str) -> httpx.AsyncClient:
    """The real OpenID flow, httpx as the browser: the portal sends it to the provider, it
    signs in there, the provider sends it back with a code the portal exchanges. Returns the
    portal client, holding the session cookie."""
    portal = httpx.AsyncClient(base_url=stack.url, timeout=REQUEST_TIMEOUT_S)
    async with httpx.AsyncClient(timeout=REQUEST_TIMEOUT_S) as browser:
        start = await portal.get("/signin?next=/credit")
        authorize = start.headers.get("location", "")
        if start.status_code != 302 or not authorize.startswith(stack.issuer):
            raise RuntimeError(f"sign-in did not start: {start.status_code}")
        form = await browser.get(authorize)
        transaction = re.search(r'name="transaction" value="([^"]+)"', form.text)
        if transaction is None:
            raise RuntimeError(f"no sign-in form at the provider: {form.status_code}")
        back = await browser.post(
            authorize.split("?", 1)[0],
            data={"transaction": transaction.group(1), "account": username, "password": DEFAULT_PASSWORD},
        )
        callback = back.headers.get("location", "")
        if back.status_code != 303 or not callback.startswith(stack.url):
            raise RuntimeError(f"the provider did not send {username} back: {back.status_code}")
    landed = await portal.get(callback.removeprefix(stack.url))
    if landed.status_code != 303:
        raise RuntimeError(f"the portal refused {username}'s sign-in: {landed.status_code}")
    return portal


# -- one page at a fixed rate --------------------------------------------------------------


def _path(page: str, resident: Resident) -> str | None:
    template = PAGES[page]
    if "{entry}" not in template:
        return template
    return template.format(entry=resident.entry_id) if resident.entry_id else None


async def drive(
    page: str, residents: Sequence[Resident], args: argparse.Namespace, pids: dict[str, int]
) -> dict[str, Any]:
    """Open loop: request i is sent at start + i/rate whatever came back before. `pids`:
    the processes whose CPU is read (name → pid)."""
    targets = [(r, p) for r in residents if (p := _path(page, r)) is not None]
    if not targets:
        return {"skipped": "no resident has an entry"}
    latencies: list[float] = []
    server: list[float] = []
    errors: Counter[str] = Counter()
    loop = asyncio.get_running_loop()

    async def one(resident: Resident, path: str, scheduled: float, measured: bool) -> None:
        try:
            response = await resident.portal.get(path)
        except httpx.HTTPError as exc:
            if measured:
                errors[type(exc).__name__] += 1
            return
        if not measured:
            return
        if response.status_code != 200:
            errors[str(response.status_code)] += 1
            return
        latencies.append((loop.time() - scheduled) * 1000)
        timing = _SERVER_TIMING.search(response.headers.get("server-timing", ""))
        if timing:
            server.append(float(timing.group(1)))

    warmup = int(args.warmup * args.rate)
    total = warmup + int(args.duration * args.rate)
    tasks: list[asyncio.Task[None]] = []
    start = loop.time()
    cpu: dict[str, float] = {}
    measured_from = start
    for i in range(total):
        if i == warmup:
            cpu = {name: cpu_seconds(pid) for name, pid in pids.items()}
            cpu["client"] = time.process_time()
            measured_from = loop.time()
        scheduled = start + i / args.rate
        delay = scheduled - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        resident, path = targets[i % len(targets)]
        tasks.append(asyncio.create_task(one(resident, path, scheduled, i >= warmup)))
    await asyncio.gather(*tasks)
    elapsed = loop.time() - measured_from
    cpu_after = {name: cpu_seconds(pid) for name, pid in pids.items()}
    cpu_after["client"] = time.process_time()
    requests = total - warmup
    return {
        "path": PAGES[page],
        "requests": requests,
        "ok": len(latencies),
        "errors": dict(errors),
        "offered_rate": args.rate,
        "achieved_rate": round(len(latencies) / elapsed, 1) if elapsed > 0 else 0.0,
        "client_ms": _quantiles(latencies, with_max=True),
        "server_ms": _quantiles(server),
        "cpu_ms_per_request": {
            name: round((cpu_after[name] - cpu[name]) / requests * 1000, 2) for name in cpu_after
        },
    }


def _quantiles(values: list[float], *, with_max: bool = False) -> dict[str, float | None]:
    out: dict[str, float | None] = {
        f"p{q}": None if (v := percentile(values, q)) is None else round(v, 1) for q in (50, 95, 99)
    }
    if with_max:
        out["max"] = round(max(values), 1) if values else None
    return out


# -- the report ----------------------------------------------------------------------------


def table(results: dict[str, Any]) -> str:
    """One line per page: what a reader compares."""
    head = (
        f"{'page':<10} {'rate/s':>7} {'ok':>5} {'err':>4}  {'client p50/p95/p99 ms':>23}"
        f"  {'server p50/p95/p99 ms':>23}  CPU ms/request (portal query rules score provider client)"
    )
    lines = [head, "-" * len(head)]

    def ms(q: dict[str, Any]) -> str:
        return " / ".join("-" if q[k] is None else f"{q[k]:,.0f}" for k in ("p50", "p95", "p99"))

    for page, r in results["pages"].items():
        if "skipped" in r:
            lines.append(f"{page:<10} skipped: {r['skipped']}")
            continue
        cpu = r["cpu_ms_per_request"]
        lines.append(
            f"{page:<10} {r['achieved_rate']:>7} {r['ok']:>5} {sum(r['errors'].values()):>4}  "
            f"{ms(r['client_ms']):>23}  {ms(r['server_ms']):>23}  "
            + " ".join(
                f"{cpu.get(n, 0):.1f}"
                for n in ("portal", "query", "rules", "score", "oidc-provider", "client")
            )
        )
    return "\n".join(lines)


async def _measure(
    stack: PortalStack,
    residents: Sequence[tuple[str, int]],
    args: argparse.Namespace,
    pids: dict[str, int],
) -> dict[str, Any]:
    usernames, _ = resident_accounts(residents)
    signed_in = [
        Resident(name, events, await sign_in(stack, name))
        for name, (_, events) in zip(usernames, residents, strict=True)
    ]
    try:
        for resident in signed_in:
            listing = await resident.portal.get("/entries")
            found = _ENTRY_LINK.search(listing.text)
            resident.entry_id = found.group(1) if found else None
        pages: dict[str, Any] = {}
        for page in args.pages.split(","):
            print(f"  {page}: {PAGES[page]} at {args.rate:g}/s for {args.duration:g} s ...", flush=True)
            before = load_average()
            pages[page] = await drive(page, signed_in, args, pids)
            pages[page]["load_average"] = {"before": before, "after": load_average()}
            print(f"    {json.dumps({k: v for k, v in pages[page].items() if k != 'path'})}", flush=True)
        return pages
    finally:
        for resident in signed_in:
            await resident.portal.aclose()


def _interrupt(_signum: int, _frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse(argv)
    # A SIGTERM must stop the processes too (the provider and the portal run in sessions of
    # their own), not orphan them.
    signal.signal(signal.SIGTERM, _interrupt)
    results: dict[str, Any] = {
        "machine": machine(),
        "command": "python -m bench.portal " + " ".join(sys.argv[1:] if argv is None else argv),
        "subjects": args.subjects,
        "target": {"page": TARGET_PAGE, "p95_ms": TARGET_P95_MS},
    }
    print(f"generating {args.subjects:,} subjects (seed {args.seed}) ...", flush=True)
    batches, residents = population(args)
    results["residents_events"] = [events for _, events in residents]
    _, account_options = resident_accounts(residents)
    with tempfile.TemporaryDirectory(prefix="egret-bench-portal-") as tmp:
        data_dir = args.data_dir or Path(tmp)
        cluster = Cluster(data_dir, log_level="warning", env=UNLIMITED)
        stack = PortalStack(
            cluster,
            resident_id=residents[0][0],
            provider_args=[*account_options, "--log-level", "warning"],
            portal_env={"EGRET_LOG_LEVEL": "warning"},
        )
        with cluster, stack:
            events = sum(len(b.events) for b in batches)
            print(f"streaming {events:,} events ...", flush=True)
            started = time.perf_counter()
            asyncio.run(stream_by_source(cluster.department_channel, batches, in_flight=4))
            cluster.wait_drained(timeout_s=args.drain_timeout)
            results["populate_seconds"] = round(time.perf_counter() - started, 1)
            print(f"  in the ledger after {results['populate_seconds']} s", flush=True)
            pids = {name: cluster.pid(name) for name in cluster.services}
            pids.update({name: stack.pid(name) for name in ("portal", "oidc-provider")})
            results["load_average_before"] = load_average()
            print(f"signing in {len(residents)} residents; load average {results['load_average_before']}")
            results["pages"] = asyncio.run(_measure(stack, residents, args, pids))
            results["load_average_after"] = load_average()
    target = results["pages"].get(TARGET_PAGE, {}).get("client_ms", {}).get("p95")
    results["target"]["met"] = target is not None and target <= TARGET_P95_MS
    m = results["machine"]
    print(f"\nmachine: {m['nproc']} CPUs, {m['cpu']}, {m['ram_gib']} GiB RAM, Python {m['python']}")
    print(f"command: {results['command']}")
    print(f"load average: {results['load_average_before']} → {results['load_average_after']}\n")
    print(table(results))
    if target is not None:
        verdict = "met" if results["target"]["met"] else "NOT met"
        print(f"\ntarget: {TARGET_PAGE} p95 {target:,.0f} ms against ≤ {TARGET_P95_MS:.0f} ms: {verdict}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
