"""Setting up the demo world: the admin bootstrap of each person, then pairing their phone,
desktop and wearable bridge through the public API, consent on the phone, and the agents.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AsyncExitStack
from pathlib import Path

from pulsesync.edge_agent.agent import Agent
from pulsesync.edge_agent.client import Credentials, open_channel, pair
from pulsesync.edge_agent.config import AgentSettings
from pulsesync.edge_agent.consent_sync import SyncedConsent
from pulsesync.edge_agent.profiles import ProfileSync
from pulsesync.server.config import NudgeConfig, ServerConfig
from pulsesync.server.demo.base import WorldBase
from pulsesync.server.demo.model import (
    NUDGE_TICK_S,
    DeviceRun,
    PersonRun,
)
from pulsesync.server.identity import IdentityStore
from pulsesync.server.storage.db import Database
from pulsesync.server.storage.sqlite.identity import SqliteIdentityStorage
from pulsesync.timeutil import US_PER_HOUR
from pulsesync.v1 import (
    common_pb2,
    devices_pb2,
    devices_pb2_grpc,
    ingest_pb2,
)


class SetUp(WorldBase):
    """Pairing each person's phone, desktop and wearable bridge, first consent, the agents."""

    def _nudge_config(self) -> NudgeConfig:
        return NudgeConfig(
            tick_seconds=NUDGE_TICK_S, seed=self.options.seed, catalog=self.options.nudge_catalog
        )

    def _day_start(self) -> int:
        return self.start_us - int(self.options.start_hour * US_PER_HOUR)

    # -- set-up: pairing, consent, agents --------------------------------------------------------
    async def _set_up(
        self, person: PersonRun, home: Path, config: ServerConfig, stack: AsyncExitStack
    ) -> None:
        # The admin bootstrap, as `pulsesync users add` and `devices pair-code` do it.
        async with await Database.open(config.database) as db:
            admin = IdentityStore(SqliteIdentityStorage(db), self.clock)
            user_id = await admin.add_user(person.name)
            first_code, _ = await admin.create_pairing_code(user_id)

        kinds = [
            ("phone", common_pb2.DEVICE_KIND_PHONE, f"{person.name.title()}'s phone"),
            ("desktop", common_pb2.DEVICE_KIND_DESKTOP, f"{person.name.title()}'s desktop"),
            (
                "wearable",
                common_pb2.DEVICE_KIND_WEARABLE_BRIDGE,
                f"{person.name.title()}'s strap bridge",
            ),
        ]
        code = first_code
        for label, kind, name in kinds:
            creds = await pair(self.address, code, kind, name)
            person.device_names[creds.device_id] = label
            state = home / label
            consent = SyncedConsent(state, creds)
            settings = AgentSettings(uplink_linger_s=0.05, tracker_linger_s=0.02)
            device = DeviceRun(label, kind, creds, state, consent)
            # The whole world runs on the simulated clock, the server's included, so the
            # devices' real clock (which stamps sent_time) is that clock too.
            device.agent = Agent(
                state / "outbox.db",
                creds,
                consent=consent,
                settings=settings,
                clock=self.clock,
                uplink_clock=self.clock,
                on_ack=self._counter(person, device),
            )
            person.devices[label] = device
            if label == "phone":
                # The person agrees to every category on first launch of the phone app; the
                # other devices learn it from the server's consent stream.
                for category in (
                    common_pb2.CONSENT_CATEGORY_BEHAVIOR,
                    common_pb2.CONSENT_CATEGORY_ACTIVITY,
                    common_pb2.CONSENT_CATEGORY_PERSONALIZATION,
                    common_pb2.CONSENT_CATEGORY_SYNC,
                ):
                    await consent.update(category, True, "demo")
                code = await self._mint_code(creds)
            elif label == "desktop":
                code = await self._mint_code(creds)
            await stack.enter_async_context(device.agent)
        for label in ("phone", "desktop"):
            d = person.devices[label]
            person.profiles[label] = ProfileSync(
                d.state_dir / "profile",
                d.creds.device_id,
                wall_ms=lambda: self.clock.now_us() // 1000,
            )
        self.note(
            person,
            "devices",
            "paired a phone, a desktop and a wearable bridge; consent granted on the phone",
        )

    async def _mint_code(self, creds: Credentials) -> str:
        """A paired device mints the next device's pairing code (CreatePairingCode)."""
        async with open_channel(creds.server) as channel:
            resp = await devices_pb2_grpc.DeviceServiceStub(channel).CreatePairingCode(
                devices_pb2.CreatePairingCodeRequest(), metadata=creds.metadata, timeout=5
            )
        return resp.pairing_code

    def _counter(
        self, person: PersonRun, device: DeviceRun
    ) -> Callable[[ingest_pb2.UploadResponse], None]:
        def on_ack(ack: ingest_pb2.UploadResponse) -> None:
            device.accepted += ack.accepted_count
            refused = sum(
                1
                for r in ack.rejected
                if r.reason == ingest_pb2.REJECTION_REASON_CONSENT_NOT_GRANTED
            )
            device.refused_for_consent += refused
            if person.consent_withdrawn_us is not None:
                person.refused_on_server_after += refused

        return on_ack
