"""Turning one API request into model inputs for one variant, and a batch of them into answers.

Policies (documented in the API too):
  - A known user's stored history comes from the artifact; their live history (events posted
    since, serving/live_state.py) follows it, then a `history` sent with the request (for that
    request only); with exclude_seen all of it is excluded as well. Their stored side features
    are used; sent features are ignored.
  - An unknown user's live history counts as theirs too.
  - An unknown user is scored from the `history` and optional features they send (user code 0).
  - History item ids the variant does not know are dropped and reported in `ignored_history`
    (catalogues move between model versions; a client should not break on a new item), or
    rejected with 422 when the request says `"unknown_items": "reject"`.
  - An unknown user with no usable history gets the popularity fallback.
  - Genre filters: `include_genres` keeps items with at least one of them, `exclude_genres`
    drops items with any of them.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from slimrec.artifact.runtime import ServedModel, UserBatch
from slimrec.artifact.user_state import (
    lists_as_csr,
    sent_history_window,
    sent_user_features,
    user_codes,
    user_feature_rows,
)
from slimrec.serving.variants import Variant

FilterKey = tuple[tuple[str, ...], tuple[str, ...]]


class QueryError(ValueError):
    """A request the variant cannot answer as asked (unknown genre, rejected history ids)."""


@dataclass
class Query:
    """One request for one variant, checked and resolved to indices, ready for `run_queries`.

    The model inputs (`UserBatch` rows) are assembled in `run_queries`, on a model thread and
    for a whole batch at once, not per request on the event loop.
    """

    k: int
    user: int | None  # a known user's index; None: a new user, described by `extra` and `features`
    extra: np.ndarray  # item indices sent as history (appended to a known user's stored one)
    features: dict = field(default_factory=dict)  # a new user's sent side features
    exclude_seen: bool = True
    filter_key: FilterKey | None = None
    allowed: np.ndarray | None = None  # bool [n_items]
    ignored_history: list[str] = field(default_factory=list)
    submitted_at: float = field(default_factory=time.perf_counter)
    request_id: str | None = None  # the HTTP request's id: log lines of its batch carry it

    @property
    def popular_only(self) -> bool:
        """An unknown user with no usable history: the popularity fallback answers."""
        return self.user is None and not len(self.extra)


@dataclass
class Answer:
    """Item indices (no -1 padding) and scores for one query; scores are None for the fallback."""

    items: np.ndarray
    scores: np.ndarray | None
    fallback: str | None
    timings: dict[str, float]  # seconds: queue, embed, retrieve, rank (of the batch it rode in)
    batch_size: int


def batch_request_ids(queries: Sequence[Query]) -> list[str]:
    """The request ids of a batch's queries (for `observability.bind_request_ids`)."""
    return [query.request_id for query in queries if query.request_id is not None]


def build_query(
    variant: Variant,
    user_id: str,
    k: int,
    exclude_seen: bool = True,
    history: list[str] | None = None,
    features: dict | None = None,
    include_genres: list[str] | None = None,
    exclude_genres: list[str] | None = None,
    reject_unknown_items: bool = False,
    live: Sequence[str] = (),
    request_id: str | None = None,
) -> Query:
    """Model inputs for one request (see the module docstring for the policies). `live`: the
    user's live history from events (oldest first), read before the sent `history`; ids this
    variant does not know are skipped silently (another variant may know them).

    Raises:
        QueryError: an unknown genre, or unknown history ids with reject_unknown_items.
    """
    extra, ignored = history_indices(variant, history or [])
    if live:
        extra = np.concatenate([history_indices(variant, live)[0], extra])
    if ignored and reject_unknown_items:
        raise QueryError(
            f"history has {len(ignored)} item id(s) this model does not know: "
            f"{', '.join(map(repr, ignored[:20]))}"
        )
    key, allowed = allowed_items(variant, include_genres or [], exclude_genres or [])
    user = variant.user_index.get(user_id)
    return Query(
        k=k,
        user=user,
        extra=extra,
        features=features or {},
        exclude_seen=exclude_seen,
        filter_key=key,
        allowed=allowed,
        ignored_history=ignored,
        request_id=request_id,
    )


def seen_items(variant: Variant, query: Query) -> np.ndarray | None:
    """What the query's answer must not contain: its user's fitted items and sent history (if
    exclude_seen); for answers assembled outside `run_queries` (the popularity fallback)."""
    if not query.exclude_seen:
        return None
    if query.user is None:
        return query.extra
    return np.concatenate([stored_items(variant.model, query.user), query.extra])


def history_indices(variant: Variant, history: Sequence[str]) -> tuple[np.ndarray, list[str]]:
    """Item indices of the known ids, in order, and the unknown ids (deduplicated, in order)."""
    index = variant.item_index
    known = [index[i] for i in history if i in index]
    ignored = list(dict.fromkeys(i for i in history if i not in index))
    return np.asarray(known, np.int64), ignored


def allowed_items(variant: Variant, include: list[str], exclude: list[str]):
    """(filter key, bool mask [n_items]) from genre lists; (None, None) without filters."""
    if not include and not exclude:
        return None, None
    unknown = sorted(g for g in {*include, *exclude} if g not in variant.genre_masks)
    if unknown:
        raise QueryError(
            f"unknown genre(s) {', '.join(map(repr, unknown))}; known genres: "
            f"{', '.join(sorted(variant.genre_masks))}"
        )
    masks = variant.genre_masks
    allowed = np.ones(variant.model.n_items, bool)
    if include:
        allowed = np.logical_or.reduce([masks[g] for g in include])
    for genre in exclude:
        allowed &= ~masks[genre]
    return (tuple(sorted(set(include))), tuple(sorted(set(exclude)))), allowed


def stored_items(model, user: int) -> np.ndarray:
    """A known user's fitted items from the artifact, oldest first."""
    return model.fitted_items[model.fitted_indptr[user] : model.fitted_indptr[user + 1]]


def sent_history_batch(model: ServedModel, queries: list[Query]) -> UserBatch:
    """Model inputs for queries with a sent history, one row each, in order.

    A known user's history is the stored one with the sent items appended, and their stored
    side features; an unknown user's is the sent items alone, with user code 0 and the sent
    side features. With exclude_seen a row excludes every item of its history (deduplicated).
    """
    users = np.array([-1 if q.user is None else q.user for q in queries], np.int64)  # -1: code 0
    items = [
        q.extra if q.user is None else np.concatenate([stored_items(model, q.user), q.extra]) for q in queries
    ]
    codes = user_codes(users)
    features = user_feature_rows(model.user_features, codes)
    unknown = np.flatnonzero(users < 0)
    if len(unknown):
        features[unknown] = sent_user_features(model.space, [queries[i].features for i in unknown])
    history = sent_history_window(items, model.space.history_len)
    nothing = np.zeros(0, np.int64)
    exclude = lists_as_csr(
        [np.unique(row) if q.exclude_seen else nothing for row, q in zip(items, queries, strict=True)]
    )
    return UserBatch(codes, features, history, *exclude)


def user_batch(variant: Variant, queries: list[Query]) -> tuple[UserBatch, list[int]]:
    """Model inputs for `queries` (none popular-only) and the query position of each row.

    Known users without a sent history, the common case, come from one `known_users` call per
    exclude_seen value; the queries with a sent history from one `sent_history_batch`.
    """
    parts, order = [], []
    for exclude_seen in (True, False):
        plain = [
            i
            for i, q in enumerate(queries)
            if q.user is not None and not len(q.extra) and q.exclude_seen == exclude_seen
        ]
        if plain:
            users = np.array([queries[i].user for i in plain], np.int64)
            parts.append(variant.model.known_users(users, exclude_seen))
            order += plain
    sent = [i for i, q in enumerate(queries) if q.user is None or len(q.extra)]
    if sent:
        parts.append(sent_history_batch(variant.model, [queries[i] for i in sent]))
        order += sent
    return concat_batches(parts), order


def concat_batches(batches: list[UserBatch]) -> UserBatch:
    """Stack single- or multi-row UserBatches into one (exclusion CSRs re-offset)."""
    if len(batches) == 1:
        return batches[0]
    offsets = np.cumsum([0] + [b.exclude_indptr[-1] for b in batches[:-1]])
    indptr = np.concatenate([[0]] + [b.exclude_indptr[1:] + o for b, o in zip(batches, offsets, strict=True)])
    sizes = [len(b.codes) for b in batches]
    # Rows known in advance (cached known users); rows of batches without them are filled so
    # that the model computes them: NaN embeddings (the tower), NaN candidate scores (a search).
    embeddings = stack_known([b.embeddings for b in batches], sizes, np.nan)
    items = stack_known([None if b.candidates is None else b.candidates[0] for b in batches], sizes, -1)
    scores = stack_known([None if b.candidates is None else b.candidates[1] for b in batches], sizes, np.nan)
    candidates = None if items is None or scores is None else (items, scores)
    return UserBatch(
        np.concatenate([b.codes for b in batches]),
        np.concatenate([b.features for b in batches]),
        np.concatenate([b.history for b in batches]),
        indptr.astype(np.int64),
        np.concatenate([b.exclude_items for b in batches]),
        embeddings,
        candidates,
    )


def stack_known(parts: list[np.ndarray | None], sizes: list[int], fill) -> np.ndarray | None:
    """`parts` stacked, each missing one as `fill` rows of the given part's width and dtype; None
    when every part is missing."""
    known = next((p for p in parts if p is not None), None)
    if known is None:
        return None
    return np.concatenate(
        [
            p if p is not None else np.full((n, *known.shape[1:]), fill, known.dtype)
            for p, n in zip(parts, sizes, strict=True)
        ]
    )


def run_queries(variant: Variant, queries: list[Query], n_candidates: int) -> list[Answer]:
    """Answer queries in one `recommend`: each row retrieved under its query's filter, all
    embedded and ranked together, with the batch's largest k.

    A query keeps the first k of its row, which is what it would have got alone (the final sort
    is stable, so top-k is a prefix of top-K). Runs in a worker thread, never on the event loop.
    """
    started = time.perf_counter()
    answers: list[Answer | None] = [None] * len(queries)
    modelled = []
    for i, query in enumerate(queries):
        if query.popular_only:
            items = variant.model.popular(query.k, allowed=query.allowed)
            answers[i] = Answer(items, None, "popular", {"queue": started - query.submitted_at}, len(queries))
        else:
            modelled.append(i)
    if not modelled:
        return answers  # type: ignore[return-value]
    group = [queries[i] for i in modelled]
    batch, order = user_batch(variant, group)
    k = max(q.k for q in group)
    rows_of: dict[FilterKey | None, list[int]] = {}
    for row, position in enumerate(order):
        rows_of.setdefault(group[position].filter_key, []).append(row)
    if len(rows_of) == 1:  # one filter (or none) for the whole batch
        recs = variant.model.recommend(batch, k, n_candidates, allowed=group[order[0]].allowed)
    else:
        filters = [(np.array(rows), group[order[rows[0]]].allowed) for rows in rows_of.values()]
        recs = variant.model.recommend(batch, k, n_candidates, filters=filters)
    for row, position in enumerate(order):
        i, query = modelled[position], group[position]
        items, scores = recs.items[row, : query.k], recs.scores[row, : query.k]
        keep = items >= 0  # fewer than k candidates survived the filters
        timings = {"queue": started - query.submitted_at, **recs.timings}
        answers[i] = Answer(items[keep], scores[keep], None, timings, len(queries))
    return answers  # type: ignore[return-value]
