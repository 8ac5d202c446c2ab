"""Embedded SQLite storage: one write connection, one read connection, numbered migrations."""
