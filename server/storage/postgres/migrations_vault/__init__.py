"""Migrations of the profile key vault's own PostgreSQL database (see postgres/keys.py)."""
