"""Helpers for tests and offline smoke runs (tiny models written without downloads)."""
