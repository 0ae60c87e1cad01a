"""Cron schedules, jitter and time windows."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from vsphere_av import config
from vsphere_av.config import parse_duration
from vsphere_av.controller.scheduling import CronTicker, Schedule
from vsphere_av.errors import ConfigError
from vsphere_av.models import TimeWindow


def at(h: int, m: int = 0, day: int = 1) -> datetime:
    return datetime(2026, 3, day, h, m, tzinfo=UTC)


@pytest.mark.parametrize(("window", "moment", "inside"), [
    ("22:00-06:00", at(23), True),
    ("22:00-06:00", at(5, 59), True),
    ("22:00-06:00", at(6), False),
    ("22:00-06:00", at(12), False),
    ("01:00-05:00", at(1), True),
    ("01:00-05:00", at(5), False),
])
def test_window_contains(window: str, moment: datetime, inside: bool) -> None:
    assert TimeWindow.parse(window).contains(moment) is inside


def test_window_next_open_and_close() -> None:
    w = TimeWindow.parse("22:00-06:00")
    assert w.next_open(at(12)) == at(22)
    assert w.next_open(at(23)) == at(23)
    assert w.closes_at(at(23)) == at(6, day=2)
    assert str(w) == "22:00-06:00"


@pytest.mark.parametrize("bad", ["22-06", "nonsense", "10:00-10:00", "25:00-01:00"])
def test_window_rejects(bad: str) -> None:
    with pytest.raises(ConfigError):
        TimeWindow.parse(bad)


@pytest.mark.parametrize(("value", "seconds"), [
    ("90", 90.0), ("30s", 30.0), ("15m", 900.0), ("2h", 7200.0), (5, 5.0), ("1d", 86400.0)])
def test_parse_duration(value: str | int, seconds: float) -> None:
    assert parse_duration(value) == seconds


@pytest.mark.parametrize("bad", ["abc", "-5", "m"])
def test_parse_duration_rejects(bad: str) -> None:
    with pytest.raises(ConfigError):
        parse_duration(bad)


def test_jitter_is_stable_spread_and_bounded() -> None:
    s = Schedule(name="nightly", cron="0 2 * * *", jitter=1800)
    fire = at(2)
    offsets = [s.offset_for(f"vm-{i}", fire) for i in range(200)]
    assert all(0 <= o < 1800 for o in offsets)
    assert offsets[0] == s.offset_for("vm-0", fire)
    # Spread: the 200 VMs do not bunch up in one minute.
    assert len({int(o // 60) for o in offsets}) > 20
    assert Schedule(name="x", cron="* * * * *").offset_for("vm", fire) == 0.0


def test_ticker_fires_once_and_collapses_missed() -> None:
    s = Schedule(name="hourly", cron="0 * * * *")
    ticker = CronTicker([s], started=at(10, 30))
    assert ticker.due(at(10, 59)) == []
    fired = ticker.due(at(11, 0))
    assert [(x.name, t) for x, t in fired] == [("hourly", at(11))]
    assert ticker.due(at(11, 0)) == []
    # Down for five hours: one firing, not five.
    assert len(ticker.due(at(16, 30))) == 1
    assert ticker.next_times()["hourly"] == at(17)


def parse_schedules(document: dict[str, object]) -> list[Schedule]:
    """[[schedule]] tables as the controller gets them: checked by config, then Schedule."""
    return [Schedule.from_settings(s) for s in config.parse(document, env={}).schedules]


def test_parse_schedules() -> None:
    got = parse_schedules({"schedule": [
        {"name": "nightly", "cron": "0 2 * * *", "jitter": "30m", "window": "01:00-05:00"},
        {"cron": "0 3 * * 0", "full": False, "vms": "web-*"},
    ]})
    assert got[0] == Schedule(name="nightly", cron="0 2 * * *", jitter=1800,
                              window=TimeWindow.parse("01:00-05:00"), full=True)
    assert got[1].name == "schedule-2"
    assert not got[1].full
    assert got[1].vms == "web-*"
    assert parse_schedules({}) == []


@pytest.mark.parametrize(("entry", "message"), [
    ({"cron": "not cron"}, "cron"),
    ({"cron": "0 2 * * *", "colour": "red"}, "unknown"),
    ({"cron": "0 2 * * *", "full": "yes"}, "full"),
    ({"cron": "0 2 * * *", "window": "bad"}, "window"),
])
def test_parse_schedules_rejects(entry: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_schedules({"schedule": [entry]})
