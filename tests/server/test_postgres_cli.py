"""`pulsesync serve --database postgresql://...` and the admin CLI on PostgreSQL, as processes.

A user and a pairing code made by the admin commands, then a device paired through the served
API: all three processes share only the PostgreSQL database named by --database.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

import grpc

from pulsesync.v1 import common_pb2, devices_pb2, devices_pb2_grpc
from tests.support.postgres import postgres_database, postgres_dsn, until

__all__ = ["postgres_database", "postgres_dsn"]


async def _cli(*args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "pulsesync.server.cli",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_serve_and_admin_commands_share_a_postgresql_database(
    tmp_path: Path, postgres_dsn: str
) -> None:
    where = ["--database", postgres_dsn, "--data-dir", str(tmp_path)]
    assert (await _cli("users", "add", "ada", *where))[0] == 0
    rc, _, err = await _cli("users", "add", "ada", *where)
    assert rc == 1
    assert "already exists" in err
    rc, out, err = await _cli("devices", "pair-code", "ada", *where)
    assert rc == 0, err
    code = out.strip()

    port_file = tmp_path / "port"
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "pulsesync.server.cli",
        "serve",
        "--port",
        "0",
        "--port-file",
        str(port_file),
        *where,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:

        async def started() -> bool:
            assert proc.returncode is None, "the server exited"
            return port_file.exists()

        await until(started, within_s=120, poll_s=0.05)
        address = f"127.0.0.1:{int(port_file.read_text())}"
        async with grpc.aio.insecure_channel(address) as ch:
            stub = devices_pb2_grpc.DeviceServiceStub(ch)
            paired = await stub.PairDevice(
                devices_pb2.PairDeviceRequest(
                    pairing_code=code, device_name="phone", kind=common_pb2.DEVICE_KIND_PHONE
                ),
                timeout=30,
            )
            listed = await stub.ListDevices(
                devices_pb2.ListDevicesRequest(),
                metadata=(("authorization", f"Bearer {paired.token}"),),
                timeout=30,
            )
        assert [d.device_id for d in listed.devices] == [paired.device.device_id]
        proc.send_signal(signal.SIGTERM)
        assert proc.stderr is not None
        err_bytes = await asyncio.wait_for(proc.stderr.read(), 60)
        assert await asyncio.wait_for(proc.wait(), 60) == 0, err_bytes.decode()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert '"message": "serving"' in err_bytes.decode()
    # Nothing was stored in a SQLite file beside the PostgreSQL database.
    assert not (tmp_path / "pulsesync.db").exists()
