"""The PulseSync server: identity, ingest, timeline, profiles, privacy and nudges over gRPC."""
