"""Two `pulsesync serve` replicas as real processes over one PostgreSQL; one SIGKILLed mid-stream.

Each replica is `pulsesync serve --database <db> --key-vault <vault db>` with a data directory
of its own; both read the key-encryption key from PULSESYNC_KEK. Three edge agents (outbox,
Tracker and uplink, the product's upload path, run in this test's process) are given both
addresses: two start on replica A, one on B, and they record events without pause. Replica A
is SIGKILLed while they do (no shutdown, no lease given back, transactions cut). Afterwards:

* every seq a replica acknowledged to an agent is in PostgreSQL's events table, once; after
  the agents drained, each device's rows are exactly seqs 1..N, nothing quarantined;
* the agents that were on A moved to B by themselves and B acknowledged what they recorded
  after the kill;
* (before the kill) a profile edit made on A reached a WatchProfile stream open on B;
* B holds every nudge shard, A's included, each taken at a new epoch, and its engine ticks
  with them as soon as it takes them (its periodic tick is an hour apart here), as its log says;
* B answers every RPC of the v1 API (walked from the service descriptors) with a valid,
  authenticated request.

Every wait is on a condition with a generous deadline; nothing asserts on wall time.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest

from pulsesync.edge_agent.client import Credentials
from pulsesync.edge_agent.config import AgentSettings
from pulsesync.edge_agent.consent import StaticConsent
from pulsesync.edge_agent.outbox import Outbox
from pulsesync.edge_agent.tracker import Tracker
from pulsesync.edge_agent.uplink import Uplink
from pulsesync.server.clock import SystemClock
from pulsesync.server.cluster import NUDGE_SHARDS
from pulsesync.server.identity import IdentityStore
from pulsesync.server.privacy.consent import CATEGORIES, ConsentStore
from pulsesync.server.privacy.keys import RECEIPT_KEY_ENV
from pulsesync.server.profiles.crypto import KEK_ENV, FileKeyStore
from pulsesync.server.storage.backend import Storage, open_storage
from pulsesync.server.storage.database_url import parse_database
from pulsesync.server.storage.nudges import DecisionRow, NewNudge, NudgeRow
from pulsesync.v1 import (
    common_pb2,
    devices_pb2,
    devices_pb2_grpc,
    events_pb2,
    ingest_pb2,
    ingest_pb2_grpc,
    nudges_pb2,
    nudges_pb2_grpc,
    privacy_pb2,
    privacy_pb2_grpc,
    profiles_pb2,
    profiles_pb2_grpc,
    timeline_pb2,
    timeline_pb2_grpc,
)
from pulsesync.wire import STREAM_OPEN
from tests.server.profiles.test_rpc import update_request
from tests.support.postgres import fresh_database, postgres_database, until
from tests.support.serve import ServeProcess
from tests.support.server import PairedDevice

__all__ = ["postgres_database"]

pytestmark = pytest.mark.slow

WITHIN_S = 60.0  # deadline of each awaited condition: generous, this machine is shared and slow
CALL_S = 30.0  # deadline of each RPC
API = (devices_pb2, ingest_pb2, timeline_pb2, profiles_pb2, nudges_pb2, privacy_pb2)


@pytest.fixture
async def databases(postgres_database: str) -> AsyncIterator[tuple[str, str]]:
    """A fresh main database and a fresh key vault database (a vault is a database of its own)."""
    async with (
        fresh_database(postgres_database) as main,
        fresh_database(postgres_database) as vault,
    ):
        yield main, vault


# -- the edge agents ------------------------------------------------------------------------
@dataclass
class EdgeAgent:
    """One device's outbox, Tracker and uplink (as edge_agent.agent.Agent wires them), started
    on a chosen replica of its server list, recording events until told to stop."""

    device: PairedDevice
    servers: str
    start_on: int
    workdir: Path
    acks: list[tuple[str, int]] = field(default_factory=list)  # (replica address, acked seq)
    outbox: Outbox | None = None
    tracker: Tracker | None = None
    uplink: Uplink | None = None
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    recording: asyncio.Event = field(default_factory=asyncio.Event)

    async def start(self) -> None:
        d = self.device
        self.outbox = outbox = await Outbox.open(self.workdir / f"{d.device_id}.db")
        self.tracker = Tracker(outbox, StaticConsent(), linger_s=0.02)
        await self.tracker.start()
        creds = Credentials(self.servers, d.device_id, d.token, d.kind)
        # Small batches and a short backoff: many batches in flight when the replica dies.
        settings = AgentSettings(batch_size=50, backoff_base_s=0.2, backoff_cap_s=1.0)
        self.uplink = Uplink(outbox, creds, settings=settings, on_ack=self._acked)
        self.uplink.servers = creds.rotation(start=self.start_on)
        self.recording.set()
        self.tasks = [
            asyncio.create_task(self.uplink.run(), name=f"uplink-{d.device_id}"),
            asyncio.create_task(self._record(), name=f"record-{d.device_id}"),
        ]

    def _acked(self, response: ingest_pb2.UploadResponse) -> None:
        assert self.uplink is not None
        if response.acked_through_seq:
            # The address of the stream that answered: the uplink moves only after a failure.
            self.acks.append((self.uplink.servers.current, response.acked_through_seq))

    async def _record(self) -> None:
        assert self.tracker is not None
        i = 0
        while self.recording.is_set():
            for _ in range(5):
                i += 1
                self.tracker.tap("reader", "home", f"card_{i}")
            await asyncio.sleep(0.02)

    def acked_on(self, address: str) -> int:
        return max((seq for at, seq in self.acks if at == address), default=0)

    @property
    def acked(self) -> int:
        return max((seq for _, seq in self.acks), default=0)

    async def drain(self) -> None:
        """Stop recording and wait until every recorded event is acknowledged."""
        assert self.tracker is not None
        assert self.outbox is not None
        self.recording.clear()
        await self.tasks[1]
        await self.tracker.flush()
        outbox = self.outbox

        async def empty() -> bool:
            assert not self.tasks[0].done(), self.tasks[0]
            return await outbox.count() == 0

        await until(empty, WITHIN_S, poll_s=0.05)

    async def stop(self) -> None:
        self.recording.clear()
        if self.tracker is not None:
            await self.tracker.close()
        for task in self.tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self.outbox is not None:
            await self.outbox.close()


# -- helpers ---------------------------------------------------------------------------------
async def _seed(storage: Storage, users: list[str]) -> dict[str, list[str]]:
    """The users, with every consent granted, and two pairing codes each."""
    ids = IdentityStore(storage.identity, SystemClock())
    consent = ConsentStore(storage.consent, SystemClock())
    codes: dict[str, list[str]] = {}
    for name in users:
        user_id = await ids.add_user(name)
        for category in CATEGORIES:
            await consent.set(user_id, category, True, device_id="test-setup")
        codes[name] = [(await ids.create_pairing_code(user_id))[0] for _ in range(2)]
    return codes


async def _pair(address: str, user: str, code: str, kind: int) -> PairedDevice:
    async with grpc.aio.insecure_channel(address) as ch:
        resp = await devices_pb2_grpc.DeviceServiceStub(ch).PairDevice(
            devices_pb2.PairDeviceRequest(
                pairing_code=code,
                device_name=f"{user}-{kind}",
                kind=kind,  # type: ignore[arg-type]
            ),
            timeout=CALL_S,
        )
    return PairedDevice(user, resp.device.device_id, resp.token, kind)


async def _nudge_holders(storage: Storage) -> dict[int, tuple[str, int]]:
    """shard -> (holder, epoch) of the nudge leases valid now, by the database's clock."""
    assert storage.pool is not None
    rows = await storage.pool.fetch(
        "SELECT shard, holder, epoch FROM leases WHERE grp = 'nudges' AND holder <> ''"
        " AND expire_us > (extract(epoch FROM clock_timestamp()) * 1000000)::bigint"
    )
    return {int(r["shard"]): (str(r["holder"]), int(r["epoch"])) for r in rows}


async def _stored_seqs(storage: Storage, device_id: str) -> tuple[list[int], int]:
    """The device's seqs in the events table (in order, repeats kept) and its quarantined rows."""
    assert storage.pool is not None
    seqs = await storage.pool.fetch(
        "SELECT e.seq FROM events e JOIN devices d USING (user_id, device_pk)"
        " WHERE d.device_id = $1 ORDER BY e.seq",
        device_id,
    )
    quarantined = await storage.pool.fetchval(
        "SELECT count(*) FROM quarantine q JOIN devices d USING (user_id, device_pk)"
        " WHERE d.device_id = $1",
        device_id,
    )
    return [int(r["seq"]) for r in seqs], int(quarantined)


def _failure(*servers: ServeProcess) -> str:
    return "\n".join(f"--- {s.name} log ---\n{s.log()[-6000:]}" for s in servers)


def _log_lines(server: ServeProcess, offset: int) -> list[dict[str, object]]:
    """The server's JSON log lines after byte `offset` of its log."""
    with server.log_path.open("rb") as f:
        f.seek(offset)
        raw = f.read().splitlines()
    lines = []
    for line in raw:
        with contextlib.suppress(ValueError):
            parsed = json.loads(line)
            if isinstance(parsed, dict):
                lines.append(parsed)
    return lines


# -- the test --------------------------------------------------------------------------------
async def test_a_replica_sigkilled_mid_stream_loses_nothing_and_the_survivor_takes_over(
    tmp_path: Path, databases: tuple[str, str]
) -> None:
    main, vault = databases
    key_file = FileKeyStore.create(tmp_path / "kek.key").path
    # Replicas share the key-encryption key and the receipt key (as an operator's secret
    # manager would give them), nothing else. The periodic nudge tick runs once, at start:
    # only a takeover makes a replica tick again.
    env = {
        KEK_ENV: key_file.read_text(),
        RECEIPT_KEY_ENV: secrets.token_hex(32),
        "PULSESYNC_NUDGE_TICK_SECONDS": "3600",
    }
    a, b = ServeProcess("a", tmp_path), ServeProcess("b", tmp_path)

    def serve_args(name: str) -> list[str]:
        data_dir = tmp_path / f"data-{name}"
        data_dir.mkdir()
        return ["--database", main, "--key-vault", vault, "--data-dir", str(data_dir)]

    agents: list[EdgeAgent] = []
    async with open_storage(parse_database(main)) as storage:  # migrates the fresh database
        codes = await _seed(storage, ["ada", "bo", "cy"])
        try:
            # A first, alone: it takes every nudge shard, which tells its lease holder id.
            await a.start(serve_args("a"), env)

            async def a_holds_all() -> bool:
                return len(await _nudge_holders(storage)) == NUDGE_SHARDS

            await until(a_holds_all, WITHIN_S, poll_s=0.1)
            holder_a = {h for h, _ in (await _nudge_holders(storage)).values()}.pop()
            await b.start(serve_args("b"), env)
            # A gives back its surplus when it sees B; B takes it at its next renewal.
            split: dict[int, tuple[str, int]] = {}

            async def shared() -> bool:
                nonlocal split
                split = await _nudge_holders(storage)
                holders = [h for h, _ in split.values()]
                return len(split) == NUDGE_SHARDS and 0 < holders.count(holder_a) < NUDGE_SHARDS

            await until(shared, WITHIN_S, poll_s=0.1)
            shards_of_a = {s: epoch for s, (h, epoch) in split.items() if h == holder_a}
            (holder_b,) = {h for h, _ in split.values()} - {holder_a}

            ada_phone = await _pair(a.address, "ada", codes["ada"][0], common_pb2.DEVICE_KIND_PHONE)
            bo_phone = await _pair(a.address, "bo", codes["bo"][0], common_pb2.DEVICE_KIND_PHONE)
            ada_desktop = await _pair(
                b.address, "ada", codes["ada"][1], common_pb2.DEVICE_KIND_DESKTOP
            )
            both = f"{a.address},{b.address}"
            agents = [
                EdgeAgent(ada_phone, both, 0, tmp_path),
                EdgeAgent(bo_phone, both, 0, tmp_path),
                EdgeAgent(ada_desktop, both, 1, tmp_path),
            ]
            on_a, on_b = agents[:2], agents[2:]
            for agent in agents:
                await agent.start()

            await _profile_edit_on_a_reaches_a_watch_on_b(a, b, ada_phone, ada_desktop)

            # Mid-stream: every agent is acked by the replica it started on, and still recording.
            async def streaming() -> bool:
                return all(x.acked_on(a.address) >= 100 for x in on_a) and all(
                    x.acked_on(b.address) >= 100 for x in on_b
                )

            await until(streaming, WITHIN_S, poll_s=0.05)
            listing, first_page = await _list_events(a, ada_phone)
            b_log_at_kill = b.log_path.stat().st_size
            await a.kill()
            assert a.proc is not None
            assert a.proc.returncode == -9  # SIGKILL
            recorded_at_kill = {}
            for agent in agents:
                assert agent.outbox is not None
                recorded_at_kill[agent.device.device_id] = agent.outbox.last_seq

            # The agents that were on A move to B by themselves; B acks what they recorded
            # after the kill (and keeps acking the agent that was on B all along).
            async def acked_by_b_after_the_kill() -> bool:
                return all(
                    x.acked_on(b.address) > recorded_at_kill[x.device.device_id] for x in agents
                )

            await until(acked_by_b_after_the_kill, WITHIN_S, poll_s=0.05)
            # A listing paged on A goes on on B: its page token is good on every replica.
            listing.page_token = first_page.next_page_token
            _, second_page = await _list_events(b, ada_phone, listing)
            assert second_page.events
            assert second_page.events[0].time.ToMicroseconds() >= (
                first_page.events[-1].time.ToMicroseconds()
            )
            assert {e.event.event_id for e in first_page.events}.isdisjoint(
                e.event.event_id for e in second_page.events
            )
            for agent in on_a:
                assert agent.uplink is not None
                assert agent.uplink.servers.moves >= 1
                assert agent.uplink.servers.current == b.address
                assert agent.acked_on(a.address) >= 100  # they were acked by A before
            for agent in agents:
                await agent.drain()
            assert b.running, _failure(b)

            # Nothing acknowledged is lost or stored twice.
            for agent in agents:
                assert agent.outbox is not None
                assert agent.uplink is not None
                last = agent.outbox.last_seq
                seqs, quarantined = await _stored_seqs(storage, agent.device.device_id)
                assert agent.acked == last > recorded_at_kill[agent.device.device_id]
                assert seqs == list(range(1, last + 1)), agent.device
                assert quarantined == 0
                assert agent.uplink.stats().rejected == 0

            # B takes every shard of the dead replica, each at a new epoch (a change of holder).
            taken: dict[int, tuple[str, int]] = {}

            async def b_holds_all() -> bool:
                nonlocal taken
                taken = await _nudge_holders(storage)
                holders = {h for h, _ in taken.values()}
                return len(taken) == NUDGE_SHARDS and holders == {holder_b}

            await until(b_holds_all, WITHIN_S, poll_s=0.1)
            assert all(taken[s][1] > epoch for s, epoch in shards_of_a.items())

            # ... and its engine decides for them from then on, without a periodic tick.
            async def b_decides_for_all() -> bool:
                return any(
                    line.get("nudge_shards_held") == NUDGE_SHARDS
                    for line in _log_lines(b, b_log_at_kill)
                )

            await until(b_decides_for_all, WITHIN_S, poll_s=0.1)

            await _every_rpc_answered(b, storage, codes["cy"])
            assert b.running, _failure(b)
        except BaseException:
            print(_failure(a, b))
            raise
        finally:
            for agent in agents:
                await agent.stop()
            await a.kill()
            await b.stop()


async def _list_events(
    server: ServeProcess,
    device: PairedDevice,
    request: timeline_pb2.ListEventsRequest | None = None,
) -> tuple[timeline_pb2.ListEventsRequest, timeline_pb2.ListEventsResponse]:
    """A page of the person's timeline from `server` (the first page of the last hour's
    events when no request is given), with the request made."""
    if request is None:
        now = time.time_ns() // 1000
        request = timeline_pb2.ListEventsRequest(page_size=20)
        request.start_time.FromMicroseconds(now - 3_600_000_000)
        request.end_time.FromMicroseconds(now + 3_600_000_000)
    async with grpc.aio.insecure_channel(server.address) as ch:
        page = await timeline_pb2_grpc.TimelineServiceStub(ch).ListEvents(
            request, metadata=device.metadata, timeout=CALL_S
        )
    return request, page


async def _profile_edit_on_a_reaches_a_watch_on_b(
    a: ServeProcess, b: ServeProcess, phone: PairedDevice, desktop: PairedDevice
) -> None:
    async with (
        grpc.aio.insecure_channel(a.address) as on_a,
        grpc.aio.insecure_channel(b.address) as on_b,
    ):
        edit = profiles_pb2_grpc.ProfileServiceStub(on_a).UpdateProfile
        resp = await edit(update_request(phone, 0, daily_steps=5001), metadata=phone.metadata)
        assert resp.committed
        watch = profiles_pb2_grpc.ProfileServiceStub(on_b).WatchProfile(
            profiles_pb2.WatchProfileRequest(), metadata=desktop.metadata, timeout=WITHIN_S
        )
        first: Any = await watch.read()
        assert first.profile.version == 1
        resp = await edit(update_request(phone, 1, daily_steps=5002), metadata=phone.metadata)
        assert resp.committed
        # Made and committed on A, rung on the doorbell, read from the table by B.
        second: Any = await watch.read()
        assert (second.profile.version, second.profile.goals.daily_steps) == (2, 5002)
        assert second.profile.update_device_id == phone.device_id
        watch.cancel()


# -- every RPC on the survivor ------------------------------------------------------------
def _api_methods() -> set[str]:
    return {
        f"{m.containing_service.full_name}/{m.name}"
        for f in API
        for service in f.DESCRIPTOR.services_by_name.values()
        for m in service.methods
    }


def _method(stub_method: Any) -> str:
    """A call's full method name, from the generated stub's multicallable."""
    path = stub_method._method  # b"/pulsesync.v1.Service/Method"
    return str(path.decode() if isinstance(path, bytes) else path).lstrip("/")


async def _first_or_open(call: Any) -> list[Any]:
    """A server stream answered: its first message, or accepted (STREAM_OPEN) and open."""
    md = await call.initial_metadata()
    assert STREAM_OPEN in list(md or ()), await call.details()
    got = []
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(2.0):
            got.append(await call.read())
    call.cancel()
    return got


def _batch(batch_id: int, seqs: range) -> ingest_pb2.EventBatch:
    now = time.time_ns() // 1000
    batch = ingest_pb2.EventBatch(batch_id=batch_id)
    batch.sent_time.FromMicroseconds(now)
    for seq in seqs:
        ev = batch.events.add(event_id=str(uuid.uuid4()), seq=seq)
        ev.device_time.FromMicroseconds(now - (10 - seq) * 1_000_000)
        ev.screen_view.app, ev.screen_view.screen = "reader", "home"
        ev.screen_view.dwell.FromSeconds(3)
    return batch


async def _every_rpc_answered(b: ServeProcess, storage: Storage, cy_codes: list[str]) -> None:
    """Call every method of the v1 API on B with a valid request of a fresh person's device
    (destructive calls last); each must answer OK. The methods called must be all there are."""
    called: set[str] = set()

    async def ok(stub_method: Any, request: Any, md: Any = None) -> Any:
        name = _method(stub_method)
        called.add(name)
        try:
            return await stub_method(request, metadata=md, timeout=CALL_S)
        except grpc.aio.AioRpcError as e:
            raise AssertionError(f"{name} on the survivor: {e.code().name} {e.details()}") from e

    async def stream(stub_method: Any, request: Any, md: Any) -> list[Any]:
        name = _method(stub_method)
        called.add(name)
        call = stub_method(request, metadata=md, timeout=CALL_S)
        try:
            return await _first_or_open(call)
        except grpc.aio.AioRpcError as e:
            raise AssertionError(f"{name} on the survivor: {e.code().name} {e.details()}") from e

    now = time.time_ns() // 1000
    async with grpc.aio.insecure_channel(b.address) as ch:
        devices = devices_pb2_grpc.DeviceServiceStub(ch)
        ingest = ingest_pb2_grpc.IngestServiceStub(ch)
        timeline = timeline_pb2_grpc.TimelineServiceStub(ch)
        profiles = profiles_pb2_grpc.ProfileServiceStub(ch)
        nudges = nudges_pb2_grpc.NudgeServiceStub(ch)
        privacy = privacy_pb2_grpc.PrivacyServiceStub(ch)

        # DeviceService
        paired = await ok(
            devices.PairDevice,
            devices_pb2.PairDeviceRequest(
                pairing_code=cy_codes[0], device_name="cy-phone", kind=common_pb2.DEVICE_KIND_PHONE
            ),
        )
        phone = PairedDevice("cy", paired.device.device_id, paired.token, paired.device.kind)
        got = await ok(
            devices.GetCurrentDevice, devices_pb2.GetCurrentDeviceRequest(), phone.metadata
        )
        assert (got.device.device_id, got.user_name) == (phone.device_id, "cy")
        code = await ok(
            devices.CreatePairingCode,
            devices_pb2.CreatePairingCodeRequest(request_id=str(uuid.uuid4())),
            phone.metadata,
        )
        laptop = await ok(
            devices.PairDevice,
            devices_pb2.PairDeviceRequest(
                pairing_code=code.pairing_code,
                device_name="cy-laptop",
                kind=common_pb2.DEVICE_KIND_DESKTOP,
            ),
        )
        listed = await ok(
            devices.ListDevices, devices_pb2.ListDevicesRequest(page_size=1), phone.metadata
        )
        assert listed.next_page_token
        rest = await ok(
            devices.ListDevices,
            devices_pb2.ListDevicesRequest(page_size=1, page_token=listed.next_page_token),
            phone.metadata,
        )
        assert {d.device_id for d in [*listed.devices, *rest.devices]} == {
            phone.device_id,
            laptop.device.device_id,
        }
        rotated = await ok(
            devices.RotateDeviceToken,
            devices_pb2.RotateDeviceTokenRequest(request_id=str(uuid.uuid4())),
            phone.metadata,
        )
        phone = PairedDevice("cy", phone.device_id, rotated.token, phone.kind)
        md = phone.metadata

        # IngestService
        batch = await ok(
            ingest.UploadBatch,
            ingest_pb2.UploadBatchRequest(
                batch=_batch(1, range(1, 4)), request_id=str(uuid.uuid4())
            ),
            md,
        )
        assert batch.ack.accepted_count == 3
        called.add(_method(ingest.Upload))
        upload: Any = ingest.Upload(metadata=md, timeout=CALL_S)  # type: ignore[call-arg]
        assert STREAM_OPEN in list(await upload.initial_metadata() or ())
        await upload.write(ingest_pb2.UploadRequest(batch=_batch(2, range(4, 6))))
        ack: Any = await upload.read()
        assert ack.acked_through_seq == 5, ack
        await upload.done_writing()
        upload.cancel()
        state = await ok(ingest.GetUploadState, ingest_pb2.GetUploadStateRequest(), md)
        assert state.acked_through_seq == 5

        # TimelineService
        req = timeline_pb2.ListEventsRequest()
        req.start_time.FromMicroseconds(now - 3_600_000_000)
        req.end_time.FromMicroseconds(now + 3_600_000_000)
        events = await ok(timeline.ListEvents, req, md)
        assert len(events.events) == 5
        summary = timeline_pb2.SummarizeActivityRequest()
        summary.start_time.CopyFrom(req.start_time)
        summary.end_time.CopyFrom(req.end_time)
        await ok(timeline.SummarizeActivity, summary, md)
        changes = await ok(timeline.ListEventChanges, timeline_pb2.ListEventChangesRequest(), md)
        assert changes.next_sync_token

        # ProfileService
        await ok(profiles.GetProfile, profiles_pb2.GetProfileRequest(), md)
        edited = await ok(profiles.UpdateProfile, update_request(phone, 0, daily_steps=7000), md)
        assert edited.committed
        (watched,) = await stream(profiles.WatchProfile, profiles_pb2.WatchProfileRequest(), md)
        assert watched.profile.goals.daily_steps == 7000

        # NudgeService: a nudge made for the phone (as an engine would) is delivered by B.
        ident = await IdentityStore(storage.identity, SystemClock()).authenticate(phone.token)
        row = NudgeRow(
            f"ndg_{uuid.uuid4().hex[:16]}", "move", "Time to move", "A short walk?", "{}", 0.5,
            "[]", now, now + 3_600_000_000,
        )  # fmt: skip
        await storage.nudges.log_decision(
            DecisionRow(
                ident.user_id, now, "schedule", "cold-start", "{}", json.dumps({"move": 0.5}),
                "{}", "move", 0.5, "{}",
            ),
            NewNudge(row, ident.device_pk, "steps"),
        )  # fmt: skip
        (delivered,) = await stream(nudges.SubscribeNudges, nudges_pb2.SubscribeNudgesRequest(), md)
        assert delivered.nudge.nudge_id == row.nudge_id
        await ok(
            nudges.FetchPendingNudges,
            nudges_pb2.FetchPendingNudgesRequest(request_id=str(uuid.uuid4())),
            md,
        )
        await ok(
            nudges.RecordNudgeFeedback,
            nudges_pb2.RecordNudgeFeedbackRequest(
                nudge_id=row.nudge_id,
                action=events_pb2.NUDGE_ACTION_OPENED,
                request_id=str(uuid.uuid4()),
            ),
            md,
        )
        listed_nudges = await ok(nudges.ListNudges, nudges_pb2.ListNudgesRequest(), md)
        assert [n.nudge.nudge_id for n in listed_nudges.nudges] == [row.nudge_id]
        await ok(
            nudges.RegisterPushTarget,
            nudges_pb2.RegisterPushTargetRequest(push_token="push-1", request_id=str(uuid.uuid4())),
            md,
        )

        # PrivacyService
        consents = await ok(privacy.GetConsents, privacy_pb2.GetConsentsRequest(), md)
        assert all(c.granted for c in consents.consents)
        await ok(
            privacy.UpdateConsent,
            privacy_pb2.UpdateConsentRequest(
                category=common_pb2.CONSENT_CATEGORY_PERSONALIZATION, granted=False,
                request_id=str(uuid.uuid4()),
            ),
            md,
        )  # fmt: skip
        (current,) = await stream(privacy.WatchConsents, privacy_pb2.WatchConsentsRequest(), md)
        assert current.consents
        await ok(privacy.GetPrivacySummary, privacy_pb2.GetPrivacySummaryRequest(), md)
        called.add(_method(privacy.ExportData))
        chunks = [
            c
            async for c in privacy.ExportData(
                privacy_pb2.ExportDataRequest(), metadata=md, timeout=CALL_S
            )
        ]
        assert any(c.chunk for c in chunks)

        # Destructive ones last.
        await ok(
            devices.RevokeDevice,
            devices_pb2.RevokeDeviceRequest(
                device_id=laptop.device.device_id, request_id=str(uuid.uuid4())
            ),
            md,
        )
        erased = await ok(privacy.EraseData, privacy_pb2.EraseDataRequest(confirmation="ERASE"), md)
        assert erased.receipt.receipt_id

    assert called == _api_methods()
