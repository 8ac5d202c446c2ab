"""Consent, transparency, export, erasure and retention."""
