"""The demo's report: one self-contained HTML file, plots inlined as PNG.

Everything in it comes from what the demo read back through the public API before erasing
the person: the merged timeline (ListEvents), activity buckets (SummarizeActivity), nudge
history with outcomes (ListNudges), the privacy summary, the export and the erasure receipt.
"""

from __future__ import annotations

import base64
import html
import io
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Final

import matplotlib
import matplotlib.dates as mdates
import matplotlib.pyplot as plt
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from pulsesync.kinds import category_name
from pulsesync.server.demo.world import DemoResult, PersonRun
from pulsesync.timeutil import US_PER_MIN
from pulsesync.v1 import events_pb2

matplotlib.use("Agg")  # files only: no display needed or wanted

DEVICE_COLORS: Final = {"phone": "#3b7dd8", "desktop": "#7a5cc2", "wearable": "#2a9d6f"}
APP_COLORS: Final = {
    "workbench": "#7a5cc2",
    "lingo": "#e07a1f",
    "news": "#3b7dd8",
    "video": "#c2417a",
}
ACTION_NAMES: Final = {
    events_pb2.NUDGE_ACTION_DELIVERED: "delivered",
    events_pb2.NUDGE_ACTION_OPENED: "opened",
    events_pb2.NUDGE_ACTION_DISMISSED: "dismissed",
    events_pb2.NUDGE_ACTION_ACTED: "acted",
}
CSS: Final = """
body { font: 15px/1.45 system-ui, -apple-system, Segoe UI, sans-serif; margin: 0; color: #1d2330;
       background: #f6f7fb; }
header { background: #1d2330; color: #fff; padding: 28px 40px; }
header h1 { margin: 0 0 6px; font-size: 26px; }
header p { margin: 0; opacity: .8; }
main { padding: 24px 40px 60px; max-width: 1200px; }
section { background: #fff; border-radius: 10px; padding: 18px 24px; margin: 18px 0;
          box-shadow: 0 1px 3px rgba(0,0,0,.08); }
h2 { font-size: 19px; margin: 0 0 12px; }
h3 { font-size: 16px; margin: 16px 0 8px; }
table { border-collapse: collapse; width: 100%; font-size: 13.5px; }
th, td { text-align: left; padding: 5px 8px; border-bottom: 1px solid #e6e8ef; vertical-align: top; }
th { background: #f0f2f7; font-weight: 600; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
.tiles { display: flex; gap: 14px; flex-wrap: wrap; }
.tile { background: #f0f2f7; border-radius: 8px; padding: 10px 14px; min-width: 130px; }
.tile b { display: block; font-size: 22px; }
img { max-width: 100%; }
.ok { color: #1f8a4c; font-weight: 600; } .bad { color: #c0392b; font-weight: 600; }
code { background: #f0f2f7; padding: 1px 4px; border-radius: 4px; }
"""


def _esc(x: object) -> str:
    return html.escape(str(x))


def _hhmm(us: int) -> str:
    return datetime.fromtimestamp(us / 1e6, UTC).strftime("%H:%M")


def _dt(us: int) -> datetime:
    return datetime.fromtimestamp(us / 1e6, UTC)


def _png(fig: Figure) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _table(
    head: Sequence[str], rows: Iterable[Sequence[object]], numeric: set[int] | None = None
) -> str:
    numeric = numeric or set()
    out = ["<table><tr>"]
    out += [
        f'<th class="{"num" if i in numeric else ""}">{_esc(h)}</th>' for i, h in enumerate(head)
    ]
    out.append("</tr>")
    for row in rows:
        out.append("<tr>")
        out += [
            f'<td class="{"num" if i in numeric else ""}">{_esc(c)}</td>' for i, c in enumerate(row)
        ]
        out.append("</tr>")
    out.append("</table>")
    return "".join(out)


# -- the day plot ----------------------------------------------------------------------------
def day_figure(result: DemoResult, person: PersonRun) -> str:
    """Device lanes with app use, steps, heart rate and HRV, with nudges marked."""
    labels = person.device_names
    spans: dict[str, list[tuple[int, int, str]]] = defaultdict(list)
    hr_t, hr_v, hrv_t, hrv_v = [], [], [], []
    for e in person.timeline:
        device = labels.get(e.device_id, "?")
        t = e.time.ToMicroseconds()
        ev = e.event
        which = ev.WhichOneof("payload")
        if which == "screen_view":
            spans[device].append((t - ev.screen_view.dwell.ToMicroseconds(), t, ev.screen_view.app))
        elif which == "feature_use":
            spans[device].append(
                (t - ev.feature_use.duration.ToMicroseconds(), t, ev.feature_use.app)
            )
        elif which == "heart_rate":
            if ev.heart_rate.HasField("bpm"):  # absent: not measured, not 0 bpm
                hr_t.append(_dt(t))
                hr_v.append(ev.heart_rate.bpm)
            if ev.heart_rate.rmssd_ms > 0:
                hrv_t.append(_dt(t))
                hrv_v.append(ev.heart_rate.rmssd_ms)
        elif which in ("steps", "cadence"):
            spans[device].append((t - US_PER_MIN, t, "activity"))

    fig, axes = plt.subplots(
        4, 1, figsize=(12, 8.2), sharex=True, gridspec_kw={"height_ratios": [1.3, 1, 1, 0.8]}
    )
    lanes, steps_ax, hr_ax, hrv_ax = axes
    order = ["phone", "desktop", "wearable"]
    for y, device in enumerate(order):
        for start, end, app in spans.get(device, []):
            color = APP_COLORS.get(app, DEVICE_COLORS.get(device, "#888"))
            lanes.barh(
                y,
                mdates.date2num(_dt(end)) - mdates.date2num(_dt(start)),
                left=mdates.date2num(_dt(start)),
                height=0.6,
                color=color,
                linewidth=0,
            )
    lanes.set_yticks(range(len(order)), order)
    lanes.set_ylim(-0.6, len(order) - 0.4)
    lanes.set_title(
        "Merged timeline per device (colour: app in use; wearable: sensor data)",
        loc="left",
        fontsize=11,
    )
    legend = [Rectangle((0, 0), 1, 1, color=c) for c in APP_COLORS.values()]
    lanes.legend(legend, list(APP_COLORS), ncol=4, fontsize=8, loc="upper right")

    bucket_t = [_dt(b.start_time.ToMicroseconds()) for b in person.buckets]
    width = 0.9 * (15 / 1440)
    steps_ax.bar(
        bucket_t, [b.steps for b in person.buckets], width=width, align="edge", color="#2a9d6f"
    )
    steps_ax.set_ylabel("steps / 15 min")
    hr_ax.plot(hr_t, hr_v, lw=0.7, color="#c0392b")
    hr_ax.set_ylabel("heart rate (bpm)")
    hrv_ax.plot(hrv_t, hrv_v, lw=0.8, color="#8e44ad", marker=".", ms=2, linestyle="none")
    hrv_ax.set_ylabel("HRV RMSSD (ms)")

    for record in person.nudge_records:
        when = _dt(record.nudge.create_time.ToMicroseconds())
        acted = events_pb2.NUDGE_ACTION_ACTED in record.feedback
        for ax in axes:
            ax.axvline(
                when, color="#1f8a4c" if acted else "#999", lw=1.1, ls="-" if acted else "--"
            )
        steps_ax.annotate(
            record.nudge.nudge_type.replace("_", " "),
            (mdates.date2num(when), 1),
            xycoords=("data", "axes fraction"),
            rotation=90,
            fontsize=7,
            va="top",
            ha="right",
        )
    hrv_ax.xaxis.set_major_formatter(mdates.DateFormatter("%H:%M", tz=UTC))
    hrv_ax.set_xlim(_dt(result.start_us), _dt(result.end_us))
    for ax in axes:
        ax.grid(alpha=0.25)
    fig.tight_layout()
    return _png(fig)


# -- sections ---------------------------------------------------------------------------------
def _events_table(person: PersonRun) -> str:
    counts: Counter[tuple[str, str]] = Counter()
    for e in person.timeline:
        which = e.event.WhichOneof("payload") or "?"
        counts[(person.device_names.get(e.device_id, "?"), which)] += 1
    rows = [(d, k.replace("_", " "), n) for (d, k), n in sorted(counts.items())]
    return _table(["device", "event kind", "events"], rows, {2})


def _nudge_rows(person: PersonRun) -> list[tuple[object, ...]]:
    rows: list[tuple[object, ...]] = []
    for r in sorted(person.nudge_records, key=lambda r: r.nudge.create_time.ToMicroseconds()):
        n = r.nudge
        feedback = ", ".join(ACTION_NAMES.get(a, str(a)) for a in r.feedback) or "-"
        outcome = (
            f"{r.outcome.metric} = {r.outcome.value:g}"
            + ("" if r.outcome.complete else " (window open)")
            if r.outcome.metric
            else "-"
        )
        device = person.device_names.get(n.device_id, n.device_id)
        rows.append(
            (
                _hhmm(n.create_time.ToMicroseconds()),
                n.nudge_type,
                device,
                f"{n.probability:.2f}",
                "; ".join(n.reasons),
                feedback,
                outcome,
            )
        )
    return rows


def policy_metrics(person: PersonRun) -> list[tuple[str, str]]:
    """Headline numbers of the policy for one person."""
    records = person.nudge_records
    sent = len(records)
    acted = [r for r in records if events_pb2.NUDGE_ACTION_ACTED in r.feedback]
    steps = [r for r in records if r.outcome.metric == "steps_30m" and r.outcome.complete]
    steps_acted = [r.outcome.value for r in steps if events_pb2.NUDGE_ACTION_ACTED in r.feedback]
    steps_other = [
        r.outcome.value for r in steps if events_pb2.NUDGE_ACTION_ACTED not in r.feedback
    ]
    by_type = Counter(r.nudge.nudge_type for r in records)

    def mean(xs: list[float]) -> str:
        return f"{sum(xs) / len(xs):.0f}" if xs else "-"

    probs = [r.nudge.probability for r in records]
    return [
        ("nudges sent", str(sent)),
        ("by type", ", ".join(f"{k} {v}" for k, v in by_type.most_common()) or "-"),
        ("acted on", f"{len(acted)} of {sent}" if sent else "-"),
        ("steps in the 30 min after (acted)", mean(steps_acted)),
        ("steps in the 30 min after (not acted)", mean(steps_other)),
        ("mean probability of the choice", f"{sum(probs) / len(probs):.2f}" if probs else "-"),
        ("outcomes measured (window closed)", f"{len(steps)} steps outcomes"),
    ]


def _privacy_section(person: PersonRun) -> str:
    parts = []
    s = person.summary
    if s is not None:
        rows = []
        for c in s.categories:
            name = category_name(c.category)
            span = (
                f"{_hhmm(c.first_time.ToMicroseconds())} to {_hhmm(c.last_time.ToMicroseconds())}"
                if c.record_count
                else "-"
            )
            rows.append(
                (
                    name,
                    c.record_count,
                    span,
                    len(c.device_ids),
                    f"{c.retention.ToSeconds() // 86400} days",
                )
            )
        parts.append("<h3>What was stored, per category</h3>")
        parts.append(
            _table(["category", "records", "time span", "devices", "retention"], rows, {1, 3})
        )
        consents = [
            (
                category_name(c.category),
                "granted" if c.granted else "withdrawn / not granted",
                c.policy_version,
            )
            for c in s.consents
        ]
        parts.append("<h3>Consents at the end of the day</h3>")
        parts.append(_table(["category", "state", "policy version"], consents))
        parts.append(f"<p>Nudges sent: {s.nudges_sent}. Devices: {s.device_count}.</p>")
    if person.consent_withdrawn_us is not None:
        parts.append(
            f"<p>Behavior tracking was withdrawn on the phone at {_hhmm(person.consent_withdrawn_us)}"
            + (
                f"; the desktop knew {person.consent_seen_on_desktop_ms:.0f} ms later"
                if person.consent_seen_on_desktop_ms is not None
                else ""
            )
            + f". Afterwards {person.dropped_on_device_after} behavior events were never recorded on the "
            f"devices and {person.refused_on_server_after} already in flight were refused by the server.</p>"
        )
    if person.export_files:
        parts.append("<h3>Export (JSON Lines per record type + manifest)</h3>")
        parts.append(_table(["file", "bytes"], sorted(person.export_files.items()), {1}))
    if person.receipt is not None:
        r = person.receipt
        parts.append("<h3>Erasure</h3>")
        parts.append(_table(["record type", "rows deleted"], sorted(r.deleted_counts.items()), {1}))
        verdict = (
            '<span class="ok">refused (UNAUTHENTICATED)</span>'
            if person.erased_token_refused
            else '<span class="bad">still accepted</span>'
        )
        parts.append(
            f"<p>Receipt <code>{_esc(r.receipt_id)}</code>, signature <code>{_esc(r.signature[:24])}…</code>. "
            f"The phone's token afterwards: {verdict}.</p>"
        )
    return "".join(parts)


def render(result: DemoResult) -> str:
    """The whole report as an HTML string."""
    o = result.options
    day = _dt(result.start_us).strftime("%A %d %B %Y")
    body = [
        f"<header><h1>PulseSync demo: a simulated day across three devices</h1>"
        f"<p>{_esc(day)}, {_hhmm(result.start_us)}&ndash;{_hhmm(result.end_us)} UTC, "
        f"{len(result.people)} person(s), played in {result.wall_seconds:.0f} s of wall time "
        f"on a real server over loopback gRPC.</p></header><main>"
    ]
    for person in result.people:
        total = len(person.timeline)
        tiles = [
            ("events merged", total),
            ("devices", 3),
            ("nudges", len(person.nudge_records)),
            (
                "acted on",
                sum(events_pb2.NUDGE_ACTION_ACTED in r.feedback for r in person.nudge_records),
            ),
            (
                "profile edit → other device",
                f"{person.profile_latency_ms:.0f} ms" if person.profile_latency_ms else "-",
            ),
        ]
        body.append(f"<h2 style='margin-top:24px'>{_esc(person.name.title())}</h2>")
        body.append(
            '<div class="tiles">'
            + "".join(f'<div class="tile"><b>{_esc(v)}</b>{_esc(k)}</div>' for k, v in tiles)
            + "</div>"
        )
        body.append(
            '<section id="timeline"><h2>The merged day</h2>'
            f'<img alt="merged timeline" src="{day_figure(result, person)}">'
            "<h3>Events per device</h3>" + _events_table(person) + "</section>"
        )
        body.append(
            '<section id="nudges"><h2>Nudges, where they went, and what followed</h2>'
            + (
                _table(
                    [
                        "time",
                        "type",
                        "device",
                        "p",
                        "why eligible / chosen",
                        "feedback",
                        "measured outcome",
                    ],
                    _nudge_rows(person),
                    {3},
                )
                if person.nudge_records
                else "<p>No nudge was sent in this period.</p>"
            )
            + "</section>"
        )
        body.append(
            '<section id="policy"><h2>Policy metrics</h2>'
            + _table(["metric", "value"], policy_metrics(person))
            + "</section>"
        )
        continuity = (
            f"<p>The phone set a 30-minute study goal and left “Spanish, lesson 12” at 60%; the "
            f"desktop's open watch stream had the new profile version {person.profile_latency_ms:.0f} ms "
            "later (stored encrypted with the person's own key).</p>"
            if person.profile_latency_ms is not None
            else "<p>The profile edit did not reach the desktop in time.</p>"
        )
        body.append(f'<section id="continuity"><h2>Continuity</h2>{continuity}</section>')
        body.append(f'<section id="privacy"><h2>Privacy</h2>{_privacy_section(person)}</section>')
    log_rows = [(_hhmm(h.t_us), h.user, h.what, h.text) for h in result.happenings]
    body.append(
        '<section id="log"><h2>What happened, as it happened</h2>'
        + _table(["time", "person", "what", ""], log_rows)
        + "</section>"
    )
    body.append(f"<p>Seed {o.seed}. Generated by <code>pulsesync demo</code>.</p></main>")
    return (
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>"
        "<meta name='viewport' content='width=device-width, initial-scale=1'>"
        f"<title>PulseSync demo report</title><style>{CSS}</style></head><body>"
        + "".join(body)
        + "</body></html>"
    )


def write_report(result: DemoResult, path: Path) -> Path:
    """Render and write the report; returns its path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render(result), encoding="utf-8")
    return path
