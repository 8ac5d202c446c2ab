"""Profile sync on the device, and the small SDK apps use: read, edit, subscribe.

    sync = ProfileSync(state_dir, device_id)
    sync.profile()                                  # the local view, works offline
    sync.edit(lambda p: setattr(p.goals, "daily_steps", 9000))
    unsubscribe = sync.subscribe(lambda p: apply_theme(p.preferences.theme))
    await sync.run(channel, credentials.metadata)   # keeps it in sync until cancelled

The device keeps the latest server version (`profile.pb`) and its not-yet-acknowledged edits
(`profile_pending.pb`) in the agent's state directory, both written atomically. An edit is
stamped with the device's hybrid logical clock, queued, shown at once in the local view
(the server version merged with the pending edits, exactly as the server will merge them)
and sent when connected; offline edits wait and go out on reconnect. The watch stream
applies every newer server version; a reconnect resumes after the last version kept.
Each send carries a request_id that is reused while the pending edits are unchanged, so a
send whose answer was lost and is sent again after a reconnect is applied once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Final

import grpc

from pulsesync import profile_document as document
from pulsesync.edge_agent import retry
from pulsesync.edge_agent.calls import new_request_id
from pulsesync.edge_agent.errors import AgentError, translate_rpc
from pulsesync.edge_agent.retry import Backoff
from pulsesync.hlc import HybridClock, Stamp
from pulsesync.profile_document import Entry, State
from pulsesync.status import error_info
from pulsesync.v1 import profiles_pb2, profiles_pb2_grpc

log = logging.getLogger(__name__)

PROFILE_FILE: Final = "profile.pb"
PENDING_FILE: Final = "profile_pending.pb"
# A profile write is one small unary call; ten seconds covers a slow mobile link.
CALL_TIMEOUT_S: Final = 10.0

Listener = Callable[[profiles_pb2.Profile], None]
Metadata = tuple[tuple[str, str], ...]


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def _wall_ms() -> int:
    return time.time_ns() // 1_000_000


class ProfileSync:
    """The device's copy of the person's profile, kept in sync with the server."""

    def __init__(
        self, state_dir: str | Path, device_id: str, *, wall_ms: Callable[[], int] = _wall_ms
    ) -> None:
        self._dir = Path(state_dir)
        self._dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.device_id = device_id
        self.hlc = HybridClock(device_id, wall_ms)
        self._server = profiles_pb2.Profile()
        self._server_state: State = {}
        self._pending: State = {}
        self._listeners: list[Listener] = []
        # (the request without its id, the id) of the last send: an unchanged request sent
        # again is a retry of it and keeps its request_id.
        self._last_send: tuple[bytes, str] | None = None
        self._wake = asyncio.Event()
        self._changed = asyncio.Event()
        self.connected = False
        self._load()

    # -- SDK ---------------------------------------------------------------------------------
    @property
    def version(self) -> int:
        """The latest server version this device has applied (0 for none)."""
        return self._server.version

    @property
    def pending_paths(self) -> list[str]:
        """Field paths edited here and not yet acknowledged by the server."""
        return sorted(self._pending)

    def profile(self) -> profiles_pb2.Profile:
        """The local view: the server version with this device's pending edits merged in."""
        if not self._pending:
            out = profiles_pb2.Profile()
            out.CopyFrom(self._server)
            return out
        view = document.build(document.merge(self._server_state, self._pending))
        view.version = self._server.version
        view.update_device_id = self._server.update_device_id
        if self._server.HasField("update_time"):
            view.update_time.CopyFrom(self._server.update_time)
        return view

    def edit(self, mutate: Callable[[profiles_pb2.Profile], None]) -> profiles_pb2.Profile:
        """Change the profile: mutate a copy; each changed field is stamped and queued.
        Raises ValueError for a value the server would refuse (nothing is queued)."""
        view = self.profile()
        current = document.state_of(view)
        draft = profiles_pb2.Profile()
        draft.CopyFrom(view)
        mutate(draft)
        values = document.fields_of(draft)
        changed = list(document.diff(current, values))
        if not changed:
            return view
        for path in changed:
            if path in document.SERVER_ONLY_PATHS:
                raise ValueError(f"{path} is kept by the server; set layout.pinned_order instead")
        try:
            document.validate(draft, changed)
        except document.DocumentError as e:
            raise ValueError(e.message) from None
        for path in changed:
            self._pending[path] = Entry(self.hlc.tick(), values.get(path))
        self._save_pending()
        self._wake.set()
        return self._changed_now()

    def subscribe(self, fn: Listener) -> Callable[[], None]:
        """Call fn(profile) with the new local view after every local or remote change."""
        self._listeners.append(fn)
        return lambda: self._listeners.remove(fn)

    async def wait_for(
        self, predicate: Callable[[profiles_pb2.Profile], bool], timeout_s: float = 10.0
    ) -> profiles_pb2.Profile:
        """The local view once predicate holds for it (TimeoutError after timeout_s)."""
        async with asyncio.timeout(timeout_s):
            while True:
                self._changed.clear()
                view = self.profile()
                if predicate(view):
                    return view
                await self._changed.wait()

    # -- applying server versions ------------------------------------------------------------
    def apply_remote(self, profile: profiles_pb2.Profile) -> bool:
        """Adopt a server version if it is newer than the one kept; whether it was."""
        if profile.version <= self._server.version:
            return False
        self._set_server(profile)
        _write_atomic(self._dir / PROFILE_FILE, profile.SerializeToString())
        self._changed_now()
        return True

    def forget_server_version(self) -> None:
        """Treat the server as new (it lost or reset our history); pending edits are kept
        and re-sent, and the next watch starts from the beginning."""
        self._set_server(profiles_pb2.Profile())
        with contextlib.suppress(FileNotFoundError):
            (self._dir / PROFILE_FILE).unlink()
        self._changed_now()

    def _set_server(self, profile: profiles_pb2.Profile) -> None:
        self._server = profile
        self._server_state = document.state_of(profile)
        for entry in self._server_state.values():
            self.hlc.observe(entry.stamp)

    # -- talking to the server ---------------------------------------------------------------
    def request(self) -> profiles_pb2.UpdateProfileRequest | None:
        """The UpdateProfile request carrying every pending edit (None if nothing pending)."""
        if not self._pending:
            return None
        values = {p: e.value for p, e in self._pending.items() if e.value is not None}
        req = profiles_pb2.UpdateProfileRequest(base_version=self._server.version)
        req.profile.MergeFromString(b"".join(values[p] for p in sorted(values)))
        for path, entry in sorted(self._pending.items()):
            req.edits.add(field_path=path, stamp=entry.stamp.to_proto(), delete=entry.value is None)
        return req

    async def push(
        self, stub: profiles_pb2_grpc.ProfileServiceAsyncStub, metadata: Metadata
    ) -> profiles_pb2.UpdateProfileResponse | None:
        """Send the pending edits once; drop those acknowledged. None if nothing to send."""
        req = self.request()
        if req is None:
            return None
        sent = dict(self._pending)
        body = req.SerializeToString(deterministic=True)
        if self._last_send is None or self._last_send[0] != body:
            self._last_send = (body, new_request_id())
        req.request_id = self._last_send[1]
        resp = await stub.UpdateProfile(req, metadata=metadata, timeout=CALL_TIMEOUT_S)
        self._last_send = None
        for path, entry in sent.items():
            if self._pending.get(path) == entry:
                del self._pending[path]
        self._save_pending()
        if resp.overridden_fields:
            log.info(
                "profile edits lost to newer ones", extra={"fields": list(resp.overridden_fields)}
            )
        if not self.apply_remote(resp.profile):
            self._changed_now()
        return resp

    async def run(
        self,
        channel: grpc.aio.Channel,
        metadata: Metadata,
        *,
        backoff: Backoff | None = None,
        server: str = "the server",
    ) -> None:
        """Watch and push until cancelled, reconnecting with full-jitter backoff (retry.WATCH
        unless given). Raises AgentError when retrying cannot help (pair again, upgrade)."""
        stub = profiles_pb2_grpc.ProfileServiceStub(channel)
        backoff = backoff or retry.WATCH.backoff()
        while True:
            try:
                async with asyncio.TaskGroup() as tg:
                    tg.create_task(self._watch(stub, metadata))
                    tg.create_task(self._push_loop(stub, metadata))
            except* (grpc.aio.AioRpcError, ConnectionResetError) as group:
                if self.connected:
                    backoff.reset()
                self.connected = False
                err = group.exceptions[0]
                if isinstance(err, grpc.aio.AioRpcError):
                    agent_err = translate_rpc(err, server=server, what="profile sync")
                    if isinstance(agent_err, AgentError):
                        raise agent_err from None
                    info = error_info(err)
                    if info is not None and info.reason == "UNKNOWN_VERSION":
                        self.forget_server_version()
                log.info("profile sync disconnected; retrying")
            await backoff.wait()

    async def _watch(
        self, stub: profiles_pb2_grpc.ProfileServiceAsyncStub, metadata: Metadata
    ) -> None:
        call = stub.WatchProfile(
            profiles_pb2.WatchProfileRequest(after_version=self._server.version),
            metadata=metadata,
        )
        async for resp in call:
            self.connected = True
            self.apply_remote(resp.profile)
        raise ConnectionResetError("the server ended the profile watch")

    async def _push_loop(
        self, stub: profiles_pb2_grpc.ProfileServiceAsyncStub, metadata: Metadata
    ) -> None:
        while True:
            self._wake.clear()
            if self._pending:
                await self.push(stub, metadata)
                self.connected = True
                continue
            await self._wake.wait()

    # -- persistence -------------------------------------------------------------------------
    def _load(self) -> None:
        path = self._dir / PROFILE_FILE
        if path.exists():
            self._set_server(profiles_pb2.Profile.FromString(path.read_bytes()))
        pending = self._dir / PENDING_FILE
        if pending.exists():
            req = profiles_pb2.UpdateProfileRequest.FromString(pending.read_bytes())
            values = document.fields_of(req.profile)
            for edit in req.edits:
                stamp = Stamp.from_proto(edit.stamp)
                self._pending[edit.field_path] = Entry(
                    stamp, None if edit.delete else values.get(edit.field_path)
                )
                self.hlc.observe(stamp)

    def _save_pending(self) -> None:
        req = self.request() or profiles_pb2.UpdateProfileRequest()
        _write_atomic(self._dir / PENDING_FILE, req.SerializeToString())

    def _changed_now(self) -> profiles_pb2.Profile:
        view = self.profile()
        self._changed.set()
        for fn in list(self._listeners):
            try:
                fn(view)
            except Exception:
                log.exception("profile listener failed")
        return view
