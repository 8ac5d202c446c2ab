from __future__ import annotations

import itertools
from collections import Counter
from pathlib import Path

import pytest

from pulsesync.edge_agent.consent import StaticConsent
from pulsesync.edge_agent.outbox import Outbox
from pulsesync.edge_agent.sources import SOURCES, SourceOptions, create_source
from pulsesync.edge_agent.sources.base import InstantClock
from pulsesync.edge_agent.sources.simulated import SimulatedDesktop, SimulatedPhone
from pulsesync.edge_agent.tracker import Tracker

START = 1_767_225_600_000_000


def _plan(cls, seed: int, n: int = 400):
    return list(itertools.islice(cls(SourceOptions(seed=seed)).events(START), n))


@pytest.mark.parametrize("cls", [SimulatedPhone, SimulatedDesktop])
def test_deterministic_by_seed_and_in_time_order(cls) -> None:
    a, b, c = _plan(cls, 1), _plan(cls, 1), _plan(cls, 2)
    assert [e.SerializeToString() for e in a] == [e.SerializeToString() for e in b]
    assert [e.SerializeToString() for e in a] != [e.SerializeToString() for e in c]
    times = [e.device_time.ToMicroseconds() for e in a]
    assert times == sorted(times)
    assert times[0] > START


def test_phone_is_short_sessions_of_screens_taps_and_searches() -> None:
    events = _plan(SimulatedPhone, 5, 3000)
    kinds = Counter(e.WhichOneof("payload") for e in events)
    assert {"session_start", "session_end", "screen_view", "tap", "search"} <= set(kinds)
    assert kinds["tap"] > kinds["screen_view"] > kinds["search"] > 0
    durations = [e.session_end.duration.ToSeconds() for e in events if e.HasField("session_end")]
    assert max(durations) < 3600
    assert sorted(durations)[len(durations) // 2] < 900


def test_desktop_is_long_sessions_of_feature_use() -> None:
    events = _plan(SimulatedDesktop, 5, 3000)
    kinds = Counter(e.WhichOneof("payload") for e in events)
    assert kinds["feature_use"] >= kinds["tap"]
    durations = [e.session_end.duration.ToSeconds() for e in events if e.HasField("session_end")]
    assert sorted(durations)[len(durations) // 2] > 1800
    assert {e.feature_use.feature for e in events if e.HasField("feature_use")} >= {
        "editor", "email"}  # fmt: skip


async def test_run_records_the_plan_up_to_the_duration(tmp_path: Path) -> None:
    options = SourceOptions(seed=3, clock=InstantClock(START), duration_s=6 * 3600)
    source = create_source("simulated-phone", options)
    async with await Outbox.open(tmp_path / "o.db") as ob:
        async with Tracker(ob, StaticConsent()) as tracker:
            await source.run(tracker)
        stored = await ob.pending(limit=100_000)
    end = START + 6 * 3600 * 1_000_000
    plan = SimulatedPhone(options).events(START)
    expected = list(itertools.takewhile(lambda e: e.device_time.ToMicroseconds() <= end, plan))
    assert len(stored) == len(expected) > 10
    assert [e.device_time for e in stored] == [e.device_time for e in expected]


def test_registry_names_and_unknown_source() -> None:
    assert {"simulated-phone", "simulated-desktop"} <= set(SOURCES)
    assert isinstance(create_source("simulated-desktop", SourceOptions()), SimulatedDesktop)
    with pytest.raises(ValueError, match="choose one of"):
        create_source("toaster", SourceOptions())


@pytest.mark.parametrize(
    ("source", "extra", "message"),
    [
        ("simulated-phone", {"speed": "2"}, r"simulated-phone has no source option 'speed' \(it takes: none\)"),
        ("emulated-wearable", {"sensor": "strap"}, r"no source option 'sensor' \(it takes: drop_every_s, sensors\)"),
        ("emulated-wearable", {"drop_every_s": "often"}, r"drop_every_s='often' is not a number"),
        ("emulated-wearable", {"drop_every_s": "-3"}, r"drop_every_s='-3' must not be negative"),
        ("wearable", {"adresses": "AA:BB:CC:DD:EE:FF"}, r"no source option 'adresses' \(it takes: addresses, state_dir\)"),
    ],
)  # fmt: skip
def test_a_source_option_it_does_not_read_or_cannot_parse_is_refused(
    source: str, extra: dict[str, str], message: str
) -> None:
    # A misspelt option was ignored: the run went on without what was asked for.
    with pytest.raises(ValueError, match=message):
        create_source(source, SourceOptions(extra=extra))
