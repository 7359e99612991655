"""The portal: the credit inquiry website for residents and businesses (docs/portal.md).

A backend-for-frontend: server-rendered pages that call query and score over gRPC with the
signed-in person's own token. It stores no credit data."""
