"""Fakes, samples and the application under test for the portal's tests."""
