"""The ingest service's settings for tests, and a late-return event."""

from __future__ import annotations

from pathlib import Path

from egret.ingest.v1 import ingest_service_pb2 as pb
from kit.settings import PeerSettings, PseudonymSettings, RelaySettings
from services.ingest.settings import IngestSettings
from tests.support.events import TEST_SUBJECT_KEY, event
from tests.support.servers import common_settings

SUBJECT = "350200199001011230"


def ingest_settings(
    database_url: str, data_dir: Path, rules_address: str, max_batch: int = 100
) -> IngestSettings:
    return IngestSettings(
        common=common_settings("ingest", database_url, data_dir),
        pseudonym=PseudonymSettings(key=TEST_SUBJECT_KEY, key_id="k1"),
        catalogue_file=Path("config/catalogue.yaml"),
        max_batch_size=max_batch,
        max_future_skew_s=300,
        max_event_age_days=3650,
        db_workers=2,
        rules=(PeerSettings(address=rules_address, deadline_s=2.0),),
        relay=RelaySettings(batch_size=50, poll_interval_s=0.05, backoff_initial_s=0.05, backoff_max_s=0.2),
    )


def late(event_id: str, days: int = 40, subject: str = SUBJECT) -> pb.Event:
    return event(event_id, "library.book_returned_late", subject, {"days_late": days})
