"""The join at the heart of the A/B report: each user's events credited to the exposures that led
to them (DEFINITIONS["credit"] in experiment/report.py). Pure functions over log records."""

from __future__ import annotations

import math
from bisect import bisect_left, bisect_right
from collections import defaultdict
from dataclasses import dataclass


@dataclass(frozen=True)
class Exposure:
    """One exposure record, its items by position; `order`: its place among the exposures."""

    order: int
    user_id: str
    arm: str
    time: float
    logged_at: float
    host: str
    pid: int
    items: tuple[str, ...]  # item at position 1, 2, ...
    record: dict

    @property
    def sort_key(self) -> tuple[float, float, int]:
        return (self.time, self.logged_at, self.order)


@dataclass(frozen=True)
class Event:
    """One event however many servers logged it; `copies`: each copy's (host, pid, logged_at)."""

    event_id: str
    user_id: str
    item_id: str
    time: float
    order: int  # the first copy's place among the events
    copies: tuple[tuple[str, int, float], ...]

    @property
    def sort_key(self) -> tuple[float, float, int]:
        return (self.time, self.copies[0][2], self.order)

    def logged_at_seen_by(self, host: str, pid: int) -> float:
        """When the exposure's own process (else its host, else anyone) logged this event: wall
        clocks compare only within one host, and paired servers log one event at different times."""
        on_host = None
        for copy_host, copy_pid, at in self.copies:
            if copy_host == host and copy_pid == pid:
                return at
            if copy_host == host and on_host is None:
                on_host = at
        return self.copies[0][2] if on_host is None else on_host


@dataclass(frozen=True)
class ExposureOutcome:
    """An exposure and what followed it: the positions of its credited items and R, the number of
    distinct items among the user's next `window` events (NDCG's ideal)."""

    exposure: Exposure
    credited_positions: tuple[int, ...]  # 1-based, ascending
    relevant: int

    def hit_at(self, k: int) -> bool:
        return bool(self.credited_positions) and self.credited_positions[0] <= k

    def ndcg_at(self, k: int) -> float:
        cut = min(k, len(self.exposure.items))
        ideal = sum(1 / math.log2(r + 1) for r in range(1, min(cut, self.relevant) + 1))
        gained = sum(1 / math.log2(p + 1) for p in self.credited_positions if p <= cut)
        return gained / ideal if ideal > 0 else 0.0


def parse_exposures(records: list[dict]) -> list[Exposure]:
    parsed = []
    for n, r in enumerate(records):
        items = sorted(r.get("items") or [], key=lambda item: item.get("position", 0))
        parsed.append(
            Exposure(
                order=n,
                user_id=str(r["user_id"]),
                arm=str(r["arm"]),
                time=float(r["time"]),
                logged_at=float(r.get("logged_at", r["time"])),
                host=str(r.get("host", "")),
                pid=int(r.get("pid", 0)),
                items=tuple(str(item["item_id"]) for item in items),
                record=r,
            )
        )
    return parsed


def dedupe_events(records: list[dict]) -> list[Event]:
    """One Event per event_id, in the order of first appearance, with every copy's logging time."""
    first: dict[str, dict] = {}
    copies: dict[str, list[tuple[str, int, float]]] = defaultdict(list)
    for r in records:
        key = str(r["event_id"])
        first.setdefault(key, r)
        copies[key].append(
            (str(r.get("host", "")), int(r.get("pid", 0)), float(r.get("logged_at", r["time"])))
        )
    return [
        Event(key, str(r["user_id"]), str(r["item_id"]), float(r["time"]), n, tuple(copies[key]))
        for n, (key, r) in enumerate(first.items())
    ]


def shown_before(exposure: Exposure, event: Event) -> bool:
    """The event came after the exposure: a later time, or the same time and logged at or after it."""
    if event.time != exposure.time:
        return event.time > exposure.time
    return event.logged_at_seen_by(exposure.host, exposure.pid) >= exposure.logged_at


def join_exposures(exposures: list[dict], events: list[dict], window: int) -> list[ExposureOutcome]:
    """Credit events to exposures (see the module docstring); one outcome per exposure, in input order.

    Args:
        exposures: exposure records, in log order.
        events: event records, in log order; copies of one event_id (paired servers) count once.
        window: an event credits an exposure only if among the user's next `window` events after it.

    Returns:
        ExposureOutcome per exposure, aligned with `exposures`.

    Example:
        >>> x = {"user_id": "u", "arm": "a", "time": 1.0, "items": [{"item_id": "i", "position": 1}]}
        >>> e = {"event_id": "e", "user_id": "u", "item_id": "i", "time": 2.0}
        >>> join_exposures([x], [e], window=10)[0].credited_positions
        (1,)
    """
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    events_of: dict[str, list[Event]] = defaultdict(list)
    for event in dedupe_events(events):
        events_of[event.user_id].append(event)
    shown_to: dict[tuple[str, str], list[Exposure]] = defaultdict(list)
    for exposure in parse_exposures(exposures):
        shown_to[exposure.user_id, exposure.arm].append(exposure)
    outcomes: list[ExposureOutcome | None] = [None] * len(exposures)
    for (user, _), shown in shown_to.items():
        user_events = sorted(events_of.get(user, []), key=lambda e: e.sort_key)
        for outcome in join_user(sorted(shown, key=lambda x: x.sort_key), user_events, window):
            outcomes[outcome.exposure.order] = outcome
    assert all(o is not None for o in outcomes)
    return outcomes  # type: ignore[return-value]


def join_user(shown: list[Exposure], events: list[Event], window: int) -> list[ExposureOutcome]:
    """The join for one user in one arm; both lists sorted by their sort_key."""
    event_times = [e.time for e in events]
    windows = [next_events(x, events, event_times, window) for x in shown]
    showing: dict[str, list[int]] = defaultdict(list)  # item -> exposures (indices of `shown`) showing it
    for n, x in enumerate(shown):
        for item in dict.fromkeys(x.items):
            showing[item].append(n)
    showing_times = {item: [shown[n].time for n in ns] for item, ns in showing.items()}
    credited: list[dict[str, int]] = [{} for _ in shown]
    for j, event in enumerate(events):
        latest = latest_showing(
            event, shown, showing.get(event.item_id, []), showing_times.get(event.item_id)
        )
        if latest is not None and j in windows[latest]:
            credited[latest].setdefault(event.item_id, shown[latest].items.index(event.item_id) + 1)
    return [
        ExposureOutcome(x, tuple(sorted(credited[n].values())), len({events[j].item_id for j in windows[n]}))
        for n, x in enumerate(shown)
    ]


def next_events(exposure: Exposure, events: list[Event], event_times: list[float], window: int) -> set[int]:
    """Indices of the user's first `window` events after the exposure."""
    picked: set[int] = set()
    for j in range(bisect_left(event_times, exposure.time), len(events)):
        if len(picked) == window:
            break
        if shown_before(exposure, events[j]):
            picked.add(j)
    return picked


def latest_showing(
    event: Event, shown: list[Exposure], ns: list[int], times: list[float] | None
) -> int | None:
    """The latest of the exposures `ns` (which show the event's item) at or before the event."""
    if not ns or times is None:
        return None
    for q in range(bisect_right(times, event.time) - 1, -1, -1):
        if shown_before(shown[ns[q]], event):
            return ns[q]
    return None
