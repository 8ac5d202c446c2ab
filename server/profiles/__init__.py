"""Encrypted, mergeable profile snapshots shared across a person's devices."""
