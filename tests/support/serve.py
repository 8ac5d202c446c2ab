"""`pulsesync serve` as a real process: started, waited for, stopped or SIGKILLed.

Used by the end-to-end tests and benchmarks that need the server as its own process (several
replicas over one PostgreSQL, a replica killed mid-stream). Its output goes to a log file, not a
pipe, so a chatty server can never block on a full pipe; `log()` reads it for assertions and
failure messages.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import AsyncIterator, Mapping, Sequence
from pathlib import Path

from tests.support.postgres import until

START_WITHIN_S = 120.0  # a fresh interpreter importing gRPC and LightGBM on a busy machine


class ServeProcess:
    """One `pulsesync serve` process, listening on a port of its own choosing (--port 0)."""

    def __init__(self, name: str, workdir: Path) -> None:
        self.name = name
        self.workdir = workdir
        self.port_file = workdir / f"{name}.port"
        self.log_path = workdir / f"{name}.log"
        self.proc: asyncio.subprocess.Process | None = None
        self.address = ""

    async def start(
        self, args: Sequence[str], env: Mapping[str, str] | None = None
    ) -> ServeProcess:
        """Starts `pulsesync serve --port 0 ARGS` and returns once it listens."""
        self.port_file.unlink(missing_ok=True)
        with self.log_path.open("ab") as log:
            self.proc = proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "pulsesync.server.cli", "serve",
                "--port", "0", "--port-file", str(self.port_file), *args,
                stdout=log, stderr=log,
                env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
            )  # fmt: skip

        async def listening() -> bool:
            assert proc.returncode is None, f"{self.name} exited at start:\n{self.log()}"
            return self.port_file.exists() and self.port_file.read_text().strip() != ""

        await until(listening, START_WITHIN_S, poll_s=0.05)
        self.address = f"127.0.0.1:{int(self.port_file.read_text())}"
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    async def kill(self) -> None:
        """SIGKILL: no shutdown, no lease release, connections cut mid-transaction."""
        if self.running:
            assert self.proc is not None
            self.proc.kill()
            await self.proc.wait()

    async def stop(self, within_s: float = 60.0) -> int | None:
        """SIGTERM and wait for a graceful exit (SIGKILL past `within_s`); the exit code."""
        if self.proc is None:
            return None
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.proc.wait(), within_s)
            except TimeoutError:
                await self.kill()
        return self.proc.returncode


@contextlib.asynccontextmanager
async def serving(
    name: str, workdir: Path, args: Sequence[str], env: Mapping[str, str] | None = None
) -> AsyncIterator[ServeProcess]:
    """A started server, stopped (or killed, if it will not stop) on the way out."""
    server = ServeProcess(name, workdir)
    try:
        yield await server.start(args, env)
    finally:
        await server.stop()
