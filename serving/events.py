"""POST /v1/events: interactions in, live histories updated, every event logged.

An event enters its user's live history when some loaded variant knows its item and its type
enters histories (`history_event_types`, all by default; nothing with `live_history` off).
Retries with a seen `event_id` are applied once. Every event that is not such a retry is
logged (events that stay out of histories may be logged again on retry: the report
deduplicates by event_id). With the shared store unreachable the batch is refused (503)
rather than half applied, and the client retries it whole.
"""

from __future__ import annotations

from fastapi import APIRouter, HTTPException
from slimrec.serving.deps import ReadyServiceDep
from slimrec.serving.records import event_record
from slimrec.serving.schemas import Event, EventsRequest, EventsResponse, error_responses
from slimrec.serving.service import Service
from slimrec.serving.state import HistoryEvent, StateUnavailable

PATH = "/v1/events"
router = APIRouter()


@router.post(PATH, responses=error_responses(400, 413, 422, 503))
async def post_events(body: EventsRequest, service: ReadyServiceDep) -> EventsResponse:
    """Append a batch of interaction events to the users' live histories and to the event log."""
    limit = service.settings.max_events_per_request
    if len(body.events) > limit:
        raise HTTPException(422, f"events: {len(body.events)} in one request, at most {limit} allowed")
    return await ingest(service, body.events)


def knows_item(service: Service, item_id: str) -> bool:
    return any(item_id in served.variant.item_index for served in service.variants.values())


async def ingest(service: Service, events: list[Event]) -> EventsResponse:
    """Classify, apply and log a batch; counts in slimrec_events_total by outcome."""
    live, counter = service.live, service.metrics.events
    known = [knows_item(service, e.item_id) for e in events]
    entering = [k and live.enters_history(e.type) for e, k in zip(events, known, strict=True)]
    candidates = [
        HistoryEvent(e.event_id, e.user_id, e.item_id, e.timestamp)
        for e, enters in zip(events, entering, strict=True)
        if enters
    ]
    try:
        applied_flags = iter(await live.history.append(candidates) if candidates else [])
    except StateUnavailable as exc:
        counter.labels("refused").inc(len(events))
        service.metrics.state_errors.labels("append_events").inc()
        raise HTTPException(
            503, f"events not recorded: state store unreachable ({exc}); retry", headers={"Retry-After": "1"}
        ) from exc
    outcome = {"applied": 0, "duplicate": 0, "unknown_item": 0, "not_in_history": 0}
    for event, is_known, enters in zip(events, known, entering, strict=True):
        applied = enters and next(applied_flags)
        kind = (
            "applied"
            if applied
            else "duplicate"
            if enters
            else "unknown_item"
            if not is_known
            else "not_in_history"
        )
        outcome[kind] += 1
        if kind != "duplicate":
            live.write(
                event_record(
                    event_id=event.event_id,
                    user_id=event.user_id,
                    item_id=event.item_id,
                    timestamp=event.timestamp,
                    type=event.type,
                    request_id=event.request_id,
                    known_item=is_known,
                    in_history=applied,
                )
            )
    for kind, count in outcome.items():
        if count:
            counter.labels(kind).inc(count)
    return EventsResponse(
        received=len(events),
        applied=outcome["applied"],
        duplicates=outcome["duplicate"],
        unknown_items=outcome["unknown_item"],
        not_in_history=outcome["not_in_history"],
    )
