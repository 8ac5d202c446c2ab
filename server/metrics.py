"""Prometheus metrics, one registry per server so that tests and embedded servers stay apart."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class Metrics:
    """The server's instruments."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.ingest_events = Counter(
            "pulsesync_ingest_events",
            "Events received on the ingest stream, by result.",
            ["result"],
            registry=r,
        )
        self.ingest_batches = Counter(
            "pulsesync_ingest_batches", "Batches received, by result.", ["result"], registry=r
        )
        self.ack_latency = Histogram(
            "pulsesync_ingest_ack_seconds",
            "Time from receiving a batch to sending its ack (validation, commit included).",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
            registry=r,
        )
        self.ingest_commits = Counter(
            "pulsesync_ingest_commits",
            "Transactions the ingest writer committed (batches share them under load).",
            registry=r,
        )
        self.nudge_decision = Histogram(
            "pulsesync_nudge_decision_seconds",
            "Time one nudge decision point takes (features, eligibility, policy, log).",
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0),
            registry=r,
        )
        self.quarantined = Counter(
            "pulsesync_quarantined_events", "Events quarantined, by reason.", ["reason"], registry=r
        )
        self.connected_devices = Gauge(
            "pulsesync_connected_devices", "Devices with at least one open stream.", registry=r
        )
        self.rpcs = Counter(
            "pulsesync_rpcs",
            "RPCs handled, by method and status code.",
            ["method", "code"],
            registry=r,
        )
