"""The end of the demo's day: each person's devices drain, then their merged timeline, activity
summary, nudges and privacy summary are read back through the API, exported and erased.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import BinaryIO

import grpc
from google.protobuf import duration_pb2

from pulsesync.edge_agent.client import open_channel
from pulsesync.server.demo.base import WorldBase, all_pages
from pulsesync.server.demo.model import (
    PersonRun,
)
from pulsesync.timeutil import timestamp
from pulsesync.v1 import (
    devices_pb2,
    devices_pb2_grpc,
    events_pb2,
    privacy_pb2,
    privacy_pb2_grpc,
    timeline_pb2,
    timeline_pb2_grpc,
)


class Collection(WorldBase):
    """The end of the day: drain the devices, read back through the API, export, erase."""

    # -- the end: drain, look, export, erase -------------------------------------------------------
    async def _finish(self, person: PersonRun) -> None:
        for label, (app, sid, began) in list(person.sessions.items()):
            person.devices[label].agent.tracker.session_end(app, sid, (self.end_us - began) / 1e6)
        person.sessions.clear()
        for d in person.devices.values():
            await d.agent.drain(timeout_s=30)
        person.dropped_on_device_after += sum(
            d.agent.tracker.stats().dropped_no_consent for d in person.devices.values()
        )
        if person.consent_withdrawn_us is not None:
            self.note(
                person,
                "consent",
                f"after withdrawal: {person.dropped_on_device_after} behavior events never left "
                f"the devices, {person.refused_on_server_after} in flight were refused by the "
                "server, none stored",
            )
        phone = person.devices["phone"]
        async with open_channel(phone.creds.server) as channel:
            md = phone.creds.metadata
            await self._collect(person, channel, md)
            await self._export(person, channel, md)
            # The apps close before the person erases their data (afterwards every token is
            # refused, which the apps would rightly report as "pair again").
            for task in person.tasks:
                task.cancel()
            await asyncio.gather(*person.tasks, return_exceptions=True)
            await self._erase(person, channel, md)

    async def _collect(
        self, person: PersonRun, channel: grpc.aio.Channel, md: tuple[tuple[str, str], ...]
    ) -> None:
        timeline = timeline_pb2_grpc.TimelineServiceStub(channel)
        start, end = self._history_range()

        async def events_page(token: str) -> tuple[list[events_pb2.TimelineEvent], str]:
            page = await timeline.ListEvents(
                timeline_pb2.ListEventsRequest(
                    start_time=start, end_time=end, page_size=1000, page_token=token
                ),
                metadata=md,
                timeout=30,
            )
            return list(page.events), page.next_page_token

        person.timeline = await all_pages(events_page)
        summary = await timeline.SummarizeActivity(
            timeline_pb2.SummarizeActivityRequest(
                start_time=timestamp(self.start_us),
                end_time=timestamp(self.end_us),
                bucket=_dur(15 * 60),
            ),
            metadata=md,
            timeout=30,
        )
        person.buckets = list(summary.buckets)
        person.nudge_records = await self._nudge_history(channel, md)
        privacy = privacy_pb2_grpc.PrivacyServiceStub(channel)
        person.summary = await privacy.GetPrivacySummary(
            privacy_pb2.GetPrivacySummaryRequest(), metadata=md, timeout=30
        )
        kinds = Counter(person.device_names.get(e.device_id, "?") for e in person.timeline)
        self.note(
            person,
            "timeline",
            f"merged timeline: {len(person.timeline)} events ("
            + ", ".join(f"{k} {v}" for k, v in sorted(kinds.items()))
            + f"), {len(person.nudge_records)} nudges with outcomes",
        )

    async def _export(
        self, person: PersonRun, channel: grpc.aio.Channel, md: tuple[tuple[str, str], ...]
    ) -> None:
        out = self.options.out_dir / f"export-{person.name}"
        out.mkdir(parents=True, exist_ok=True)
        privacy = privacy_pb2_grpc.PrivacyServiceStub(channel)
        files: dict[str, int] = {}
        handles: dict[str, BinaryIO] = {}
        try:
            async for chunk in privacy.ExportData(
                privacy_pb2.ExportDataRequest(), metadata=md, timeout=120
            ):
                f = handles.get(chunk.file_name)
                if f is None:
                    f = handles[chunk.file_name] = (out / chunk.file_name).open("wb")
                f.write(chunk.chunk)
                files[chunk.file_name] = files.get(chunk.file_name, 0) + len(chunk.chunk)
        finally:
            for f in handles.values():
                f.close()
        person.export_files = files
        self.note(
            person,
            "privacy",
            f"exported {len(files)} files ({sum(files.values()) / 1024:.0f} KiB) to {out}",
        )

    async def _erase(
        self, person: PersonRun, channel: grpc.aio.Channel, md: tuple[tuple[str, str], ...]
    ) -> None:
        privacy = privacy_pb2_grpc.PrivacyServiceStub(channel)
        resp = await privacy.EraseData(
            privacy_pb2.EraseDataRequest(confirmation="ERASE"), metadata=md, timeout=60
        )
        person.receipt = resp.receipt
        try:
            await devices_pb2_grpc.DeviceServiceStub(channel).ListDevices(
                devices_pb2.ListDevicesRequest(), metadata=md, timeout=5
            )
        except grpc.aio.AioRpcError as e:
            person.erased_token_refused = e.code() == grpc.StatusCode.UNAUTHENTICATED
        deleted = sum(resp.receipt.deleted_counts.values())
        self.note(
            person,
            "privacy",
            f"erased: {deleted} rows deleted, keys destroyed, receipt {resp.receipt.receipt_id[:12]}…; "
            f"the phone's token is {'refused' if person.erased_token_refused else 'STILL ACCEPTED'}",
        )


def _dur(seconds: int) -> duration_pb2.Duration:
    d = duration_pb2.Duration()
    d.FromSeconds(seconds)
    return d
