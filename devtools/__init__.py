"""Developer tools: a synthetic population, a local four-service cluster, the streaming
ingest client and the `make run` demo. Shared by the demo, the benchmark and the end
to end tests; never imported by the services themselves."""
