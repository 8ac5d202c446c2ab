"""Ingest pipeline and the merged per-user timeline."""
