"""The Python client of Egret's four gRPC services.

    from egret_client import Connection, load_profile

    async with Connection(load_profile()) as egret:
        reply = await egret.query.GetScore(request)

A `Connection` opens one channel per service from a `Profile` (endpoints, TLS files, a
token source), each with gRPC's own retry policy for the idempotent calls (a service
config) and a deadline on every call that sets none. `egret_client.submitter` streams
events with resend-on-break; `egret_client.errors` decodes the rich error details.
"""

from egret_client.connection import Connection
from egret_client.errors import ErrorReport, error_report
from egret_client.profile import Profile, ProfileError, load_profile

__all__ = ["Connection", "ErrorReport", "Profile", "ProfileError", "error_report", "load_profile"]
