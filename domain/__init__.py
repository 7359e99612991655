"""Egret's shared domain: what several services must compute identically.

Pure Python: no grpc, no SQLAlchemy, no durable-rules (an import contract in pyproject.toml
checks it). Services import this package and kit; no service imports another service.
"""
