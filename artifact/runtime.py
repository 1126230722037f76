"""A model as served: ONNX Runtime sessions, a FAISS index and plain tables, loaded from an artifact.

`ServedModel.recommend` is the one request path (user tower -> index top-N ->
drop seen/filtered -> ranker -> top-k), batched over users. The server calls it,
and so does `slimrec evaluate`, so the quality measured offline is the quality served.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
from slimrec.artifact.features import FeatureSpace
from slimrec.artifact.index import IndexSpec, ItemIndex
from slimrec.artifact.load import Artifact
from slimrec.artifact.manifest import MANIFEST, ArtifactError
from slimrec.artifact.ort import run_session, session
from slimrec.artifact.user_state import csr_rows, empty_csr, user_inputs


@dataclass
class UserBatch:
    """Model inputs for B requests, plus what each must not be recommended (CSR of item indices)."""

    codes: np.ndarray  # int64 [B], 0 = unknown user
    features: np.ndarray  # int64 [B, 4]
    history: np.ndarray  # int64 [B, N] item codes, right-aligned
    exclude_indptr: np.ndarray  # int64 [B + 1]
    exclude_items: np.ndarray  # item indices: int32 from the fitted table, int64 from sent histories
    # User-tower outputs known in advance (float32 [B, D]; rows of NaN are computed by the tower),
    # or None: the tower computes every row.
    embeddings: np.ndarray | None = None
    # Retrieval's answer known in advance, for requests without a filter (items int32 [B, N],
    # scores float32 [B, N]; rows whose first score is NaN are searched), or None: all searched.
    candidates: tuple[np.ndarray, np.ndarray] | None = None


@dataclass
class Recommendations:
    items: np.ndarray  # int64 [B, k] item indices, -1 where fewer than k were available
    scores: np.ndarray  # float32 [B, k]
    timings: dict[str, float]  # seconds per stage for the batch: embed, retrieve, rank


# Candidates handed to the ranker when the artifact names no budget of its own (see candidate_budget).
DEFAULT_N_CANDIDATES = 200
BudgetSource = Literal["artifact", "default"]
# Users embedded together and alone to tell whether the user tower is batch-independent.
PROBE_USERS = 32


def candidate_budget(artifact: Artifact) -> int:
    """The ranker's candidate budget the artifact was tuned for (see `candidate_budget_and_source`).

    Example:
        >>> candidate_budget(load_artifact("artifacts/compressed"))
        100
    """
    return candidate_budget_and_source(artifact)[0]


def candidate_budget_and_source(artifact: Artifact) -> tuple[int, BudgetSource]:
    """The ranker's candidate budget and where it comes from: manifest `serving.n_candidates`,
    chosen on validation by `slimrec compress` ("artifact"), or DEFAULT_N_CANDIDATES for an
    artifact without one ("default").

    Raises:
        ArtifactError: `serving.n_candidates` is not a positive integer (names the manifest).

    Example:
        >>> candidate_budget_and_source(load_artifact("artifacts/teacher"))
        (200, 'default')
    """
    serving = artifact.manifest.get("serving") or {}
    if not isinstance(serving, dict):
        raise ArtifactError(f"{artifact.path / MANIFEST}: serving must be an object, got {serving!r}")
    if "n_candidates" not in serving:
        return DEFAULT_N_CANDIDATES, "default"
    value = serving["n_candidates"]
    if type(value) is not int or value < 1:
        raise ArtifactError(
            f"{artifact.path / MANIFEST}: serving.n_candidates must be a positive integer, got {value!r}"
        )
    return value, "artifact"


class ServedModel:
    def __init__(self, artifact: Artifact, prefix: str = "", threads: int = 1):
        config = artifact.config
        entry = config["models"][prefix]
        self.artifact, self.prefix = artifact, prefix
        self.space = FeatureSpace.from_dict(config["feature_space"])
        self.retrieval_weight = float(entry["retrieval_weight"])
        self.temperature = float(entry["temperature"])
        self.user_tower = session(artifact.file(f"{prefix}user_tower.onnx"), threads)
        self.ranker = session(artifact.file(f"{prefix}ranker.onnx"), threads)
        self.index = ItemIndex.load(artifact.file(f"{prefix}items.faiss"), IndexSpec(**entry["index"]))
        tables = artifact.read_tensors(f"{prefix}tables.safetensors")
        self.user_features = tables["user_features"]  # int32 at rest; rows widen to int64 per batch
        self.fitted_indptr, self.fitted_items = tables["fitted_indptr"], tables["fitted_items"]
        self.popular_items = tables["popular_items"]
        self.n_users, self.n_items = self.space.n_users, self.space.n_items
        # recommend's default, and where it comes from (the artifact's, or the default)
        self.n_candidates, self.n_candidates_from = candidate_budget_and_source(artifact)
        self.user_embeddings: np.ndarray | None = None  # [n_users, D] once cache_user_embeddings ran
        self.user_candidates: tuple[np.ndarray, np.ndarray] | None = None  # once cache_user_candidates ran
        if self.index.n_items != self.n_items:
            raise ValueError(
                f"{artifact.path}: index holds {self.index.n_items} items, the feature space {self.n_items}"
            )

    # --- request assembly ----------------------------------------------------------------------

    def known_users(self, users: np.ndarray, exclude_seen: bool = True) -> UserBatch:
        """State of known users as of the end of their fitted interactions (slimrec.artifact.user_state).

        Args:
            users: int [B] user indices.
            exclude_seen: exclude each user's fitted items (else exclude nothing).
        Returns:
            UserBatch of B rows; exclude_items in the fitted table's dtype, int32 as written.
        """
        indptr = self.fitted_indptr
        inputs = user_inputs(
            users,
            self.user_features,
            self.fitted_items,
            indptr[users],
            indptr[users + 1],
            self.space.history_len,
        )
        exclude = csr_rows(indptr, self.fitted_items, users) if exclude_seen else empty_csr(len(users))
        cached = self.user_embeddings[users] if self.user_embeddings is not None else None
        candidates = None
        if exclude_seen and self.user_candidates is not None:
            candidates = (self.user_candidates[0][users], self.user_candidates[1][users])
        return UserBatch(*inputs, *exclude, cached, candidates)

    def cache_user_embeddings(self, max_users: int = 100_000, batch_size: int = 256) -> bool:
        """Compute every known user's embedding once, so that requests from known users without a
        sent or live history skip the user tower. Each cached row equals what the tower returns
        for that user alone (a lone request): batch_size users a call where the tower's rows do
        not depend on what shares their batch, one user a call where they do (a dynamically
        quantized tower scales its activations per batch: batched, every row of the ml-100k int8
        tower differs from its lone one). `batch_independent` tells the two apart on a probe.

        Args:
            max_users: above this many users nothing is cached (loading would take too long).
            batch_size: users per tower call for a batch-independent tower.
        Returns:
            Whether the cache was built ([n_users, D] float32, on `user_embeddings`).
        """
        if self.n_users > max_users:
            return False
        self.user_embeddings = None  # known_users below must run the tower
        step = batch_size if self.batch_independent() else 1
        rows = [
            self.embed(self.known_users(np.arange(s, min(s + step, self.n_users))))
            for s in range(0, self.n_users, step)
        ]
        self.user_embeddings = np.concatenate(rows).astype(np.float32, copy=False)
        return True

    def cache_user_candidates(
        self, max_bytes: int = 64 << 20, batch_size: int = 256, max_seconds: float = 10.0
    ) -> bool:
        """Retrieve every known user's candidates once (their fitted items excluded, no filter),
        so that requests from known users without a sent or live history skip the index search.
        A user's row is what `retrieve` gives them in any batch: each row is searched on its own
        (ml-100k compressed, 9 users a batch: the search and the exclusions were ~57 of ~148 us
        of model-thread time per request). `retrieve` takes a prefix of a row for a smaller
        budget and searches for a larger one or with a filter.

        Args:
            max_bytes: above this size (n_users x budget x 8 bytes) nothing is cached.
            batch_size: users per retrieval call while building.
            max_seconds: nothing is cached when the first call says that building would take
                longer (an exact index over a large catalogue: a slow start, a slow reload).
        Returns:
            Whether the cache was built (`user_candidates`: items int32 and scores float32,
            [n_users, budget]).
        """
        depth = self.n_candidates
        if self.n_users * depth * 8 > max_bytes:
            return False
        self.user_candidates = None  # known_users below must not hand the old rows on
        rows = []
        started = time.perf_counter()
        for start in range(0, self.n_users, batch_size):
            batch = self.known_users(np.arange(start, min(start + batch_size, self.n_users)))
            rows.append(self.retrieve(self.user_vectors(batch), depth, batch))
            if start == 0 and (time.perf_counter() - started) * self.n_users / len(batch.codes) > max_seconds:
                return False
        items = np.concatenate([r[0] for r in rows]).astype(np.int32)
        self.user_candidates = (items, np.concatenate([r[1] for r in rows]).astype(np.float32))
        return True

    def batch_independent(self, n_probe: int = PROBE_USERS) -> bool:
        """Whether the user tower's rows for known users are bit-for-bit the same embedded in one
        batch as one at a time, on up to n_probe users spread over the catalogue (one call for
        the batch, one per user). A dynamically quantized tower fails on every row in practice
        (its activation scale is the batch's range); the fp32 towers tried pass (ml-100k: every
        row of a 256-user batch equals its lone one).
        """
        users = np.unique(np.linspace(0, self.n_users - 1, min(n_probe, self.n_users)).astype(np.int64))
        together = self.embed(self.known_users(users))
        alone = np.concatenate([self.embed(self.known_users(users[i : i + 1])) for i in range(len(users))])
        return bool(np.array_equal(together, alone))

    # --- stages -------------------------------------------------------------------------------

    def embed(self, batch: UserBatch) -> np.ndarray:
        """User-tower outputs [B, D] (the tower runs on every row; see `user_vectors`)."""
        return run_session(
            self.user_tower, user_code=batch.codes, user_features=batch.features, history=batch.history
        )

    def user_vectors(self, batch: UserBatch) -> np.ndarray:
        """The batch's user embeddings: those known in advance, the tower's for the rest."""
        known = batch.embeddings
        if known is None:
            return self.embed(batch)
        missing = np.flatnonzero(np.isnan(known[:, 0]))
        if not len(missing):
            return known
        vectors = known.copy()
        vectors[missing] = self.embed(_rows(batch, missing))
        return vectors

    def retrieve(
        self, user_emb: np.ndarray, n: int, batch: UserBatch, allowed: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-n item indices [B, n] (-1 padded) and scores, excluded and disallowed items dropped.

        A row is safe when searched n + (its excluded count) deep. One search that deep for the
        whole batch makes every row pay for the heaviest user's history, and the heap's cost
        grows with k (ml-100k, 16 users: 0.47 ms at k 200, 1.27 ms at k 524). So the batch is
        searched FIRST_PASS_DEPTH x n deep (enough for 90% of ml-100k users), and only the rows
        left short by their exclusions are searched again, as deep as they need (16 users:
        0.92 ms instead of 1.38). The answer is the same: a row's first n kept items do not
        depend on how deep it was searched (for flat and IVF indexes; among items with equal
        scores at the cut, which ones fill the last slots may differ). Rows whose answer the
        batch carries (`candidates`, from `cache_user_candidates`) are not searched at all.
        """
        cached = batch.candidates
        if cached is None or allowed is not None or not 0 < n <= cached[0].shape[1]:
            return self._search_rows(user_emb, n, batch, allowed)
        items, scores = cached[0][:, :n].astype(np.int64), cached[1][:, :n].copy()
        missing = np.flatnonzero(np.isnan(scores[:, 0]))
        if len(missing):
            items[missing], scores[missing] = self._search_rows(
                user_emb[missing], n, _rows(batch, missing), allowed
            )
        return items, scores

    def _search_rows(
        self, user_emb: np.ndarray, n: int, batch: UserBatch, allowed: np.ndarray | None
    ) -> tuple[np.ndarray, np.ndarray]:
        """`retrieve` through the index, for every row of the batch."""
        n_excluded = np.diff(batch.exclude_indptr)
        needed = np.minimum(self.n_items, n + n_excluded)  # per row
        k = int(needed.max(initial=n))
        if len(needed) > 1:  # a single row gains nothing from two passes
            k = min(k, max(n, int(FIRST_PASS_DEPTH * n)))
        items, scores = self._search_excluding(user_emb, k, n, batch, allowed)
        redo = np.flatnonzero((needed > k) & (items[:, -1] < 0)) if n > 0 else np.zeros(0, np.int64)
        if len(redo):
            deeper = int(needed[redo].max())
            items[redo], scores[redo] = self._search_excluding(
                user_emb[redo], deeper, n, _rows(batch, redo), allowed
            )
        return items, scores

    def _search_excluding(
        self, user_emb: np.ndarray, k: int, n: int, batch: UserBatch, allowed: np.ndarray | None
    ) -> tuple[np.ndarray, np.ndarray]:
        scores, items = self.index.search(user_emb, k, allowed)
        drop = items < 0
        if len(batch.exclude_items):
            drop |= _member_rows(items, batch.exclude_indptr, batch.exclude_items, self.n_items)
        return _compact(items, scores, drop, n)  # disallowed items never left the index

    def rank(self, batch: UserBatch, candidates: np.ndarray, retrieval_scores: np.ndarray) -> np.ndarray:
        """Final scores [B, C]: ranker logit + retrieval_weight * retrieval score / temperature."""
        logits = run_session(
            self.ranker,
            user_code=batch.codes,
            user_features=batch.features,
            history=batch.history,
            candidates=np.maximum(candidates, -1) + 1,
        )
        real = candidates >= 0  # padding scores -inf, and 0 * -inf would be NaN (with a warning)
        final = logits + self.retrieval_weight * np.where(real, retrieval_scores, 0.0) / self.temperature
        return np.where(real, final, -np.inf).astype(np.float32)

    def recommend(
        self,
        batch: UserBatch,
        k: int,
        n_candidates: int | None = None,
        allowed: np.ndarray | None = None,
        filters: Sequence[tuple[np.ndarray, np.ndarray | None]] | None = None,
    ) -> Recommendations:
        """Top-k items of each row: the index's top-N candidates, ranked.

        Args:
            n_candidates: N; None: the artifact's budget (`self.n_candidates`). At least k are
                ranked, so a request for more items than the budget still gets k.
            allowed: bool [n_items], the items every row may get (None: all).
            filters: instead of `allowed`, (rows, allowed) pairs covering the batch: each row is
                retrieved under its own filter, and all are embedded and ranked in one call each
                (requests with different genre filters share the model calls of their batch).
        """
        n = max(self.n_candidates if n_candidates is None else n_candidates, k)
        t0 = time.perf_counter()
        user_emb = self.user_vectors(batch)
        t1 = time.perf_counter()
        if filters is None:
            cands, cand_scores = self.retrieve(user_emb, n, batch, allowed)
        else:
            cands = np.full((len(user_emb), n), -1, np.int64)
            cand_scores = np.full((len(user_emb), n), -np.inf, np.float32)
            for rows, mask in filters:
                cands[rows], cand_scores[rows] = self.retrieve(user_emb[rows], n, _rows(batch, rows), mask)
        t2 = time.perf_counter()
        final = self.rank(batch, cands, cand_scores)
        order = np.argsort(-final, axis=1, kind="stable")[:, :k]
        t3 = time.perf_counter()
        items = np.take_along_axis(cands, order, 1)
        scores = np.take_along_axis(final, order, 1)
        return Recommendations(items, scores, {"embed": t1 - t0, "retrieve": t2 - t1, "rank": t3 - t2})

    def popular(self, k: int, exclude: np.ndarray | None = None, allowed: np.ndarray | None = None):
        """The popularity fallback: most-interacted items, minus exclusions and filtered items."""
        keep = np.ones(len(self.popular_items), bool)
        if exclude is not None and len(exclude):
            keep &= ~np.isin(self.popular_items, exclude)
        if allowed is not None:
            keep &= allowed[self.popular_items]
        return self.popular_items[keep][:k]


# The first retrieval pass searches this many times n deep (see ServedModel.retrieve).
FIRST_PASS_DEPTH = 1.5


def _rows(batch: UserBatch, rows: np.ndarray) -> UserBatch:
    """The sub-batch of these rows."""
    indptr, excluded = csr_rows(batch.exclude_indptr, batch.exclude_items, rows)
    known = batch.embeddings[rows] if batch.embeddings is not None else None
    cached = None if batch.candidates is None else (batch.candidates[0][rows], batch.candidates[1][rows])
    return UserBatch(
        batch.codes[rows], batch.features[rows], batch.history[rows], indptr, excluded, known, cached
    )


# Below this many [rows x items] cells the member test uses a dense mask: fancy indexing
# only, where the sorted-key test's sort and binary search each drop the GIL and, under load,
# wait for the event loop to hand it back.
DENSE_MEMBER_CELLS = 1 << 22


def _member_rows(items: np.ndarray, indptr: np.ndarray, members: np.ndarray, n_items: int) -> np.ndarray:
    """[B, K] bool: is items[b, j] in row b of the CSR (indptr, members); items are in [-1, n_items)."""
    rows = np.repeat(np.arange(len(indptr) - 1), np.diff(indptr))
    if len(items) * (n_items + 1) <= DENSE_MEMBER_CELLS:
        mask = np.zeros((len(items), n_items + 1), bool)  # column n_items stays False: -1 lands there
        mask[rows, members] = True
        return mask[np.arange(len(items))[:, None], items]
    bound = np.int64(n_items + 2)
    keys = np.sort(rows * bound + members)
    query = np.arange(len(items))[:, None] * bound + items
    pos = np.minimum(np.searchsorted(keys, query), max(len(keys) - 1, 0))
    return keys[pos] == query if len(keys) else np.zeros(items.shape, bool)


def _compact(items: np.ndarray, scores: np.ndarray, drop: np.ndarray, n: int):
    """Keep the first n undropped entries of each row, in order; pad with -1 / -inf."""
    keep = ~drop
    slot = np.cumsum(keep, axis=1) - 1  # where each kept entry lands in its row
    placed = keep & (slot < n)
    rows = np.nonzero(placed)[0]
    width = max(n, 0)
    out_items = np.full((len(items), width), -1, np.int64)
    out_scores = np.full((len(items), width), -np.inf, np.float32)
    out_items[rows, slot[placed]] = items[placed]
    out_scores[rows, slot[placed]] = scores[placed]
    return out_items, out_scores
