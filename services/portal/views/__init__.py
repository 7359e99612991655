"""View models: records → what the pages show. Pure: no HTTP, no gRPC; each takes a
Localiser for its words, dates and numbers."""
