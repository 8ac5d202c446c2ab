"""Erasure through the CLI while the server runs ends the person's streams as the API does."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from pulsesync.server.app import RunningServer
from pulsesync.server.cli import main
from pulsesync.server.rpc.base import error_info
from pulsesync.v1 import privacy_pb2, privacy_pb2_grpc
from tests.support.server import pair_device


async def test_cli_erasure_ends_streams_with_user_erased(
    server: RunningServer, channel: grpc.aio.Channel
) -> None:
    phone = await pair_device(server, "ada")
    stub = privacy_pb2_grpc.PrivacyServiceStub(channel)
    # No deadline that a slow machine could hit before the sweep: the wait below bounds it.
    watch = stub.WatchConsents(privacy_pb2.WatchConsentsRequest(), metadata=phone.metadata)
    await watch.read()

    flags = ["--data-dir", str(server.app.config.data_dir)]
    assert await asyncio.to_thread(main, ["privacy", "erase", "ada", "--yes", *flags]) == 0

    with pytest.raises(grpc.aio.AioRpcError) as err:
        await asyncio.wait_for(watch.read(), 90)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    info = error_info(err.value)
    assert info is not None
    assert info.reason == "USER_ERASED"
