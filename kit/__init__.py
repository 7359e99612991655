"""The shared kit: cross-cutting code every Egret service uses, written once.

Settings, logging, tracing, database engines and migrations, the outbox, the gRPC
server runtime (health, reflection, interceptors, graceful shutdown) and error
mapping live here; service code holds only what is particular to its service.
"""
