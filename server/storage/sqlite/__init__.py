"""SQLite implementations of the per-domain storage seams, over one `Database`."""
