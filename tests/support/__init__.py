"""Helpers for tests: in-process servers on loopback, common settings, sample events."""
