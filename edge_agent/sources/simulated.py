"""Simulated apps of one person: a study app on the phone, a work app on the desktop.

Deterministic by seed: the same seed and start time give the same events with the same
device times at any speed. `events(start_us)` is the plan (an endless iterator of Events in
time order); `run(tracker)` paces it on the source's clock and records each event.
"""

from __future__ import annotations

import math
import random
import uuid
from collections.abc import Iterator
from typing import Final

from pulsesync.edge_agent.sources.base import SourceOptions, check_extra
from pulsesync.edge_agent.tracker import Tracker
from pulsesync.timeutil import US_PER_S
from pulsesync.v1 import events_pb2

_US: Final = US_PER_S


def _event(at_us: int) -> events_pb2.Event:
    e = events_pb2.Event()
    e.device_time.FromMicroseconds(at_us)
    return e


class _Plan:
    """Builds events on a moving cursor of simulated time."""

    def __init__(self, app: str, rng: random.Random, start_us: int) -> None:
        self.app, self.rng, self.t = app, rng, start_us

    def wait(self, seconds: float) -> None:
        self.t += max(1, int(seconds * _US))

    def lognormal(self, median_s: float, sigma: float, lo: float, hi: float) -> float:
        return min(hi, max(lo, median_s * math.exp(self.rng.gauss(0, sigma))))

    def session_id(self) -> str:
        return str(uuid.UUID(int=self.rng.getrandbits(128), version=4))

    def session_start(self, sid: str) -> events_pb2.Event:
        e = _event(self.t)
        e.session_start.app, e.session_start.session_id = self.app, sid
        return e

    def session_end(self, sid: str, began_us: int) -> events_pb2.Event:
        e = _event(self.t)
        e.session_end.app, e.session_end.session_id = self.app, sid
        e.session_end.duration.FromMicroseconds(self.t - began_us)
        return e

    def screen_view(self, screen: str, dwell_us: int) -> events_pb2.Event:
        e = _event(self.t)
        e.screen_view.app, e.screen_view.screen = self.app, screen
        e.screen_view.dwell.FromMicroseconds(dwell_us)
        return e

    def tap(self, screen: str, target: str) -> events_pb2.Event:
        e = _event(self.t)
        e.tap.app, e.tap.screen, e.tap.target = self.app, screen, target
        return e

    def search(self, query: str, results: int) -> events_pb2.Event:
        e = _event(self.t)
        e.search.app, e.search.query, e.search.result_count = self.app, query, results
        return e

    def feature_use(self, feature: str, duration_us: int) -> events_pb2.Event:
        e = _event(self.t)
        e.feature_use.app, e.feature_use.feature = self.app, feature
        e.feature_use.duration.FromMicroseconds(duration_us)
        return e


class _Simulated:
    """Shared pacing: record the plan's events on the clock until the duration is over."""

    APP = ""
    SOURCE = ""  # its name in sources.SOURCES

    def __init__(self, options: SourceOptions | None = None) -> None:
        self.options = options or SourceOptions()
        check_extra(self.options, self.SOURCE)  # it takes no options

    def events(self, start_us: int) -> Iterator[events_pb2.Event]:
        """The endless plan from start_us, in time order."""
        raise NotImplementedError

    async def run(self, tracker: Tracker) -> None:
        """Record the plan into tracker, paced by the clock, until the duration is over."""
        clock = self.options.clock
        start = clock.now_us()
        end = (
            None if self.options.duration_s is None else start + int(self.options.duration_s * _US)
        )
        for event in self.events(start):
            at = event.device_time.ToMicroseconds()
            if end is not None and at > end:
                await clock.sleep_until(end)
                return
            await clock.sleep_until(at)
            tracker.record(event)


# Phone: a study app used in short bursts through the day.
_PHONE_SCREENS: Final = {
    "home": ["start_button", "streak_badge", "deck_list_link"],
    "deck_list": ["deck_card", "add_deck", "sort_menu"],
    "deck": ["flip_card", "know_it", "dont_know", "play_audio"],
    "quiz": ["answer_a", "answer_b", "answer_c", "hint"],
    "results": ["retry", "share", "done"],
    "settings": ["reminder_toggle", "theme", "back"],
}
_PHONE_QUERIES: Final = ["spanish verbs", "anatomy", "periodic table", "calculus limits",
                         "french food", "kanji n5", "statistics", "ww2 dates"]  # fmt: skip


class SimulatedPhone(_Simulated):
    """A person's phone running a study app: short sessions of screens, taps and searches."""

    APP = "studybuddy"
    SOURCE = "simulated-phone"

    def events(self, start_us: int) -> Iterator[events_pb2.Event]:
        """The endless plan from start_us, in time order."""
        p = _Plan(self.APP, random.Random(f"phone:{self.options.seed}"), start_us)
        screens = list(_PHONE_SCREENS)
        p.wait(p.rng.uniform(1, 30))  # the first pick-up comes soon, then through the day
        while True:
            sid, began = p.session_id(), p.t
            yield p.session_start(sid)
            screen = "home"
            for _ in range(p.rng.randint(3, 12)):
                dwell = p.lognormal(20, 0.7, 2, 240)
                entered = p.t
                for _ in range(p.rng.randint(0, 4)):
                    p.wait(dwell / 5 * p.rng.random())
                    yield p.tap(screen, p.rng.choice(_PHONE_SCREENS[screen]))
                if p.rng.random() < 0.15:
                    yield p.search(p.rng.choice(_PHONE_QUERIES), p.rng.randint(0, 40))
                p.t = max(p.t, entered + int(dwell * _US))
                yield p.screen_view(screen if screen != "deck" else f"deck/{p.rng.randint(1, 9)}",
                                    p.t - entered)  # fmt: skip
                screen = p.rng.choice(screens)
            p.wait(1)
            yield p.session_end(sid, began)
            p.wait(p.lognormal(15 * 60, 0.8, 60, 2 * 3600))  # until the next pick-up


# Desktop: a work app used in long sessions, where feature use dominates.
_DESKTOP_FEATURES: Final = {"editor": 35, "email": 20, "chat": 15, "calendar": 10,
                            "flashcards": 10, "reports": 10}  # fmt: skip
_DESKTOP_PAGES: Final = ["dashboard", "inbox", "doc/roadmap", "doc/notes", "calendar/week",
                         "reports/q3"]  # fmt: skip
_DESKTOP_QUERIES: Final = ["meeting notes", "budget", "invoice 2291", "onboarding",
                           "release plan", "vacation policy"]  # fmt: skip


class SimulatedDesktop(_Simulated):
    """A person's desktop running a work app: long sessions, mostly feature use."""

    APP = "workdesk"
    SOURCE = "simulated-desktop"

    def events(self, start_us: int) -> Iterator[events_pb2.Event]:
        """The endless plan from start_us, in time order."""
        p = _Plan(self.APP, random.Random(f"desktop:{self.options.seed}"), start_us)
        features, weights = list(_DESKTOP_FEATURES), list(_DESKTOP_FEATURES.values())
        p.wait(p.rng.uniform(1, 60))
        while True:
            sid, began = p.session_id(), p.t
            yield p.session_start(sid)
            length = p.lognormal(75 * 60, 0.4, 20 * 60, 4 * 3600)
            while p.t - began < length * _US:
                page = p.rng.choice(_DESKTOP_PAGES)
                dwell = p.lognormal(90, 0.8, 5, 1800)
                entered = p.t
                p.wait(dwell)
                yield p.screen_view(page, p.t - entered)
                feature = p.rng.choices(features, weights)[0]
                used = p.lognormal(4 * 60, 0.8, 10, 1800)
                p.wait(used)
                yield p.feature_use(feature, int(used * _US))
                if p.rng.random() < 0.3:
                    p.wait(p.rng.uniform(1, 20))
                    yield p.tap(page, p.rng.choice(["save", "share", "comment", "filter"]))
                if p.rng.random() < 0.1:
                    p.wait(p.rng.uniform(2, 30))
                    yield p.search(p.rng.choice(_DESKTOP_QUERIES), p.rng.randint(0, 200))
            p.wait(1)
            yield p.session_end(sid, began)
            p.wait(p.lognormal(30 * 60, 0.6, 5 * 60, 4 * 3600))  # a break
