"""The SQLite implementations of the per-domain storage seams in `pulsesync.server.storage`."""
