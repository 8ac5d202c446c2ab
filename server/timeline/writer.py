"""Group commit: the server's side of the ingest writer process.

Validated batches of every stream go to one writer process (`committer`), which stores all
the batches that are waiting in one transaction and answers once they are durable. The event
loop only marshals each batch's rows into a pipe (~0.06 us a row) and resolves the batch's
future when the answer comes back; the SQLite work runs beside the loop, outside its GIL.

Other writers (devices, consent, profiles, erasure) keep using `Database.transaction()` on
the server's own connection; while one runs, the writer process waits before its next group
(see `Database.watch_writes`), so that they are not left to SQLite's busy handler.

If the writer process dies, the batches it had not answered fail (the agents resend them;
deduplication makes that safe) and a new process is started.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final, Protocol

from pulsesync.server.logs import uses_json_lines
from pulsesync.server.storage.db import BUSY_TIMEOUT_MS, Database, storage_damaged_error
from pulsesync.server.timeline import committer
from pulsesync.server.timeline.committer import Batch, EventRow, QuarantineRow

log = logging.getLogger(__name__)

# How long start() waits for the writer process to open the database.
START_TIMEOUT_S: Final = 30.0
# How long stop() waits for the queued batches to be committed.
STOP_TIMEOUT_S: Final = 10.0
# Before starting a new process after one died: a crash loop must not spin.
RESTART_DELAY_S: Final = 1.0

__all__ = [
    "Conflict",
    "EventRow",
    "EventWriter",
    "GroupCommitWriter",
    "Outcome",
    "PendingBatch",
    "QuarantineRow",
]


@dataclass(frozen=True, slots=True)
class Conflict:
    """An event whose seq already holds a different event: quarantined, not stored."""

    seq: int
    event_id: str
    detail: str


@dataclass(frozen=True, slots=True)
class Outcome:
    """What the commit did with a batch's valid events."""

    inserted: list[EventRow]
    duplicates: int
    conflicts: list[Conflict]
    derived: Any  # what the commit hook made of the inserted rows, or None
    watermark: int = 0  # the device's contiguous ack watermark after the commit


@dataclass(slots=True)
class PendingBatch(Batch):
    """A validated batch waiting for the writer."""

    future: asyncio.Future[Outcome] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )


class WriterClosed(RuntimeError):
    """The writer is stopping or stopped; the batch was not stored."""


class EventWriter(Protocol):
    """Where ingest sends validated batches: the seam between the pipeline and a backend.

    Every implementation keeps the ingest promises: a batch's future resolves only once its
    rows are durably committed (ack after commit); a seq already stored with the same event is
    a duplicate and with another event a conflict, quarantined with its reason; the outcome
    carries the device's contiguous watermark as committed with the rows. On SQLite this is the
    writer process (`GroupCommitWriter`); on PostgreSQL, group commit with binary COPY
    (`pulsesync.server.storage.postgres.ingest_writer`). The composition root picks one."""

    async def start(self) -> None: ...

    async def stop(self) -> None:
        """Commit what is queued, then stop; later batches fail with WriterClosed."""
        ...

    def submit(self, batch: PendingBatch) -> asyncio.Future[Outcome]:
        """Queue a batch; its future resolves once it is durably committed."""
        ...

    def forget_device(self, device_pk: int) -> None:
        """The device's rows were erased: drop anything remembered about its seqs."""
        ...


class GroupCommitWriter:
    """Sends every ingest write to the writer process, which shares commits between batches."""

    def __init__(
        self,
        db: Database,
        commit_hook: str = "",
        on_commits: Callable[[int], None] | None = None,
    ) -> None:
        """commit_hook: a function the writer process runs on each batch's inserted rows, by
        name ("package.module:function", see committer.py); its result is Outcome.derived.
        on_commits: told how many transactions the process committed with each answer."""
        self._db = db
        self._hook = commit_hook
        self._on_commits = on_commits
        self._proc: asyncio.subprocess.Process | None = None
        self._turn: int | None = None  # our end of the process's control pipe
        self._unwatch: Any = None
        self._reader: asyncio.Task[None] | None = None
        self._waiting: dict[int, PendingBatch] = {}  # token -> batch sent, not yet answered
        self._next_token = 0
        self._closed = False

    async def start(self) -> None:
        """Start the writer process; returns once it has opened the database."""
        await self._spawn()
        self._unwatch = self._db.watch_writes(self._signal_turn)

    async def stop(self) -> None:
        """Commit what is queued, then stop the process."""
        self._closed = True
        if self._unwatch is not None:
            self._unwatch()
        proc = self._proc
        if proc is not None and proc.stdin is not None:
            proc.stdin.close()  # the process commits what it has, answers, and exits
            with contextlib.suppress(ConnectionError):
                await proc.stdin.wait_closed()
        if proc is not None:
            try:
                await asyncio.wait_for(proc.wait(), STOP_TIMEOUT_S)
            except TimeoutError:
                log.warning("the ingest writer did not finish its queue in time")
                await _kill(proc)
        reader = self._reader  # a restart in progress may have started a new one
        if reader is not None:
            if self._proc is None:
                reader.cancel()  # between two processes: do not start another
            # The answers the process sent before it exited.
            await asyncio.wait({reader}, timeout=STOP_TIMEOUT_S)
            reader.cancel()
        self._close_turn()
        self._fail_waiting("the server is shutting down")

    @property
    def pid(self) -> int | None:
        """The writer process's id, while it runs."""
        return self._proc.pid if self._proc is not None else None

    def submit(self, batch: PendingBatch) -> asyncio.Future[Outcome]:
        """Queue a batch; the future resolves once it is durably committed."""
        proc = self._proc
        if self._closed:
            batch.future.set_exception(WriterClosed("the server is shutting down"))
            return batch.future
        if self._db.damage is not None:
            batch.future.set_exception(storage_damaged_error())
            return batch.future
        if proc is None or proc.stdin is None or proc.stdin.is_closing():
            batch.future.set_exception(WriterClosed("the ingest writer is restarting; resend"))
            return batch.future
        self._next_token += 1
        token = self._next_token
        self._waiting[token] = batch
        proc.stdin.write(committer.frame(("batch", token, *batch.fields())))
        return batch.future

    def forget_device(self, device_pk: int) -> None:
        """Drop the cached high-water mark (after the device's rows were deleted)."""
        proc = self._proc
        if proc is not None and proc.stdin is not None and not proc.stdin.is_closing():
            proc.stdin.write(committer.frame(("forget", device_pk)))

    # -- the process ----------------------------------------------------------------------
    async def _spawn(self) -> None:
        turn_r, turn_w = os.pipe()
        try:
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                committer.__name__,
                str(self._db.path),
                str(turn_r),
                str(BUSY_TIMEOUT_MS),
                "json" if uses_json_lines() else "text",
                self._hook,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                pass_fds=(turn_r,),
                limit=committer.PIPE_BYTES,
            )
        except BaseException:
            os.close(turn_w)
            raise
        finally:
            os.close(turn_r)
        os.set_blocking(turn_w, False)
        self._turn = turn_w
        assert proc.stdin is not None
        assert proc.stdout is not None
        transport: Any = proc.stdin.transport
        committer.widen_pipe(transport.get_extra_info("pipe").fileno())
        try:
            ready = await asyncio.wait_for(_read_message(proc.stdout), START_TIMEOUT_S)
        except (TimeoutError, asyncio.IncompleteReadError) as e:
            await _kill(proc)
            self._close_turn()
            raise RuntimeError(
                f"the ingest writer could not open {self._db.path} (see the log above)"
            ) from e
        assert ready == ("ready",)
        self._proc = proc
        self._reader = asyncio.create_task(self._answers(proc), name="ingest-writer-answers")

    async def _answers(self, proc: asyncio.subprocess.Process) -> None:
        """Resolve each batch's future as the process answers; replace it if it dies."""
        assert proc.stdout is not None
        try:
            while True:
                commits, results = await _read_message(proc.stdout)
                if commits and self._on_commits is not None:
                    self._on_commits(commits)
                for result in results:
                    self._resolve(result)
        except asyncio.IncompleteReadError:
            pass  # the process exited
        except Exception:
            log.exception("unreadable answer from the ingest writer; replacing it")
            await _kill(proc)
        if self._closed:
            return
        self._proc = None  # until a new one runs, batches are refused at once
        code = await proc.wait()
        log.error("the ingest writer process exited (code %s); starting a new one", code)
        self._close_turn()
        self._fail_waiting("the ingest writer restarted; resend the batch")
        while not self._closed:
            await asyncio.sleep(RESTART_DELAY_S)
            try:
                await self._spawn()
                return
            except Exception:
                log.exception("could not start the ingest writer; trying again")

    def _resolve(self, result: tuple[Any, ...]) -> None:
        batch = self._waiting.pop(result[0], None)
        if batch is None or batch.future.done():
            return
        if len(result) == 3:
            _, message, code = result
            # A full disk or a damaged file is told to the client as such (STORAGE_FULL,
            # STORAGE_DAMAGED), not as a failure worth resending at once.
            error = self._db.storage_error(code, message)
            batch.future.set_exception(
                error or RuntimeError(f"storing the batch failed: {message}")
            )
            return
        _, inserted, duplicates, conflicts, derived, watermark = result
        rows = batch.rows if inserted is None else [batch.rows[i] for i in inserted]
        batch.future.set_result(
            Outcome(rows, duplicates, [Conflict(*c) for c in conflicts], derived, watermark),
        )

    def _fail_waiting(self, why: str) -> None:
        waiting, self._waiting = self._waiting, {}
        for batch in waiting.values():
            if not batch.future.done():
                batch.future.set_exception(WriterClosed(why))

    def _signal_turn(self, held: bool) -> None:
        """Tell the process that one of the server's own transactions holds the database."""
        if self._turn is not None:
            with contextlib.suppress(BlockingIOError, BrokenPipeError):
                os.write(self._turn, b"1" if held else b"0")

    def _close_turn(self) -> None:
        if self._turn is not None:
            os.close(self._turn)
            self._turn = None


async def _kill(proc: asyncio.subprocess.Process) -> None:
    """Kill the process and reap it; for a process that should be running.

    Never call it on one that may just have exited on its own: Popen.send_signal() polls
    first, and a poll that reaps the process leaves asyncio's child watcher no exit status
    (it logs "Unknown child process" and reports 255).
    """
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
    await proc.wait()


async def _read_message(stream: asyncio.StreamReader) -> Any:
    head = await stream.readexactly(4)
    return committer.unframe(await stream.readexactly(int.from_bytes(head, "little")))
