"""`pulsesync serve --database postgresql://...` and the admin CLI on PostgreSQL, as processes.

A user and a pairing code made by the admin commands, then a device paired through the served
API: all three processes share only the PostgreSQL database named by --database.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import grpc

from pulsesync.v1 import common_pb2, devices_pb2, devices_pb2_grpc
from tests.support.postgres import postgres_database, postgres_dsn
from tests.support.serve import ServeProcess

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

    server = ServeProcess("serve", tmp_path)
    try:
        await server.start(where)
        async with grpc.aio.insecure_channel(server.address) as ch:
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
        assert await server.stop() == 0, server.log()
    finally:
        await server.kill()
    assert '"message": "serving"' in server.log()
    # Nothing was stored in a SQLite file beside the PostgreSQL database.
    assert not (tmp_path / "pulsesync.db").exists()
