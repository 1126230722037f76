"""Item indexes for candidate retrieval (FAISS), behind one small interface.

`build_item_index(embeddings, IndexSpec(...))` returns an `ItemIndex` whose
`search(queries, k)` gives (scores, item indices). FAISS pads short result lists
with id -1; `search` keeps that padding as -1 and -inf so callers can drop it,
and nothing downstream ever treats -1 as an item.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import faiss
import numpy as np

# IVF with scalar-quantized codes: 8, 6 or 4 bits per dimension. On the 1M-item synthetic catalogue
# (d 48, nlist 4000, nprobe 16) recall@200 vs exact was 0.9977 / 0.9976 / 0.9942 (ties within 1e-3).
SQ_KINDS = {
    "ivf_sq8": faiss.ScalarQuantizer.QT_8bit,
    "ivf_sq6": faiss.ScalarQuantizer.QT_6bit,
    "ivf_sq4": faiss.ScalarQuantizer.QT_4bit,
}
INDEX_KINDS = ("flat", *SQ_KINDS, "ivf_pq_refine", "hnsw")


@dataclass
class IndexSpec:
    kind: str = "flat"
    nlist: int | None = None  # IVF cells; None: about 4 * sqrt(n_items)
    nprobe: int = 16
    pq_m: int = 8  # sub-quantizers for ivf_pq_refine
    hnsw_m: int = 32
    ef_construction: int = 200
    ef_search: int = 256

    def __post_init__(self):
        if self.kind not in INDEX_KINDS:
            raise ValueError(f"unknown index kind {self.kind!r}; expected one of {INDEX_KINDS}")
        if self.nprobe < 1:
            raise ValueError(f"nprobe must be >= 1, got {self.nprobe}")

    def to_dict(self) -> dict:
        return asdict(self)


class ItemIndex:
    """Inner-product search over item embeddings; ids are catalogue item indices."""

    def __init__(self, index: faiss.Index, spec: IndexSpec):
        self.index, self.spec = index, spec
        self.apply_search_params()

    @property
    def n_items(self) -> int:
        return self.index.ntotal

    @property
    def dim(self) -> int:
        return self.index.d

    def apply_search_params(self) -> None:
        if self.spec.kind in SQ_KINDS or self.spec.kind == "ivf_pq_refine":
            faiss.extract_index_ivf(self.index).nprobe = self.spec.nprobe
        elif self.spec.kind == "hnsw":
            faiss.downcast_index(self.index).hnsw.efSearch = self.spec.ef_search

    def search(
        self, queries: np.ndarray, k: int, allowed: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """queries [nq, d] -> (scores float32 [nq, k], item indices int64 [nq, k]); -1 pads with -inf.

        `allowed` (bool [n_items]) restricts the search to those items inside FAISS (an IDSelector
        tested per scanned item), so a filter costs no deeper search: the alternative, searching
        k + (number of filtered-out items) deep and dropping them afterwards, took 44 ms a request
        on a million-item catalogue. IVF results are the same either way: the allowed items of
        the probed lists.
        """
        k = min(k, self.n_items)
        x = np.ascontiguousarray(queries, dtype=np.float32)
        if allowed is None:
            scores, ids = self.index.search(x, k)
        else:
            bitmap = np.packbits(np.asarray(allowed, bool), bitorder="little")  # referenced until searched
            selector = faiss.IDSelectorBitmap(len(allowed), faiss.swig_ptr(bitmap))
            scores, ids = self.index.search(x, k, params=self._search_params(selector))
        scores[ids < 0] = -np.inf
        return scores, ids

    def _search_params(self, selector) -> faiss.SearchParameters:
        """This index's search settings plus `selector` (explicit parameters replace the index's own)."""
        if self.spec.kind in SQ_KINDS:
            return faiss.SearchParametersIVF(sel=selector, nprobe=self.spec.nprobe)
        if self.spec.kind == "ivf_pq_refine":
            refine = faiss.downcast_index(self.index)
            return faiss.IndexRefineSearchParameters(
                k_factor=refine.k_factor,
                base_index_params=faiss.SearchParametersIVF(sel=selector, nprobe=self.spec.nprobe),
            )
        if self.spec.kind == "hnsw":
            return faiss.SearchParametersHNSW(sel=selector, efSearch=self.spec.ef_search)
        return faiss.SearchParameters(sel=selector)

    def save(self, path: Path) -> None:
        faiss.write_index(self.index, str(path))

    @classmethod
    def load(cls, path: Path, spec: IndexSpec) -> ItemIndex:
        return cls(faiss.read_index(str(path)), spec)

    def memory_bytes(self) -> int:
        """Bytes of the serialised index, a close proxy for its resident size."""
        return int(faiss.serialize_index(self.index).size)


def set_search_threads(threads: int) -> None:
    """OpenMP threads for FAISS searches made on the calling thread (0 leaves the default).

    OpenMP's thread count is a per-thread setting, so a thread that searches must set it itself:
    set on a server's event-loop thread, it left the model thread searching with a team as large
    as the machine, whose idle member spun between searches (0.56 of 2 cores at saturation,
    compressed on ml-100k).
    """
    if threads:
        faiss.omp_set_num_threads(threads)


def drop_interrupt_checks() -> None:
    """Stop FAISS from taking the GIL inside searches to look for Ctrl-C (process-wide).

    FAISS's Python module installs a callback that long loops (IVF lists, flat blocks) call to
    check for signals, and each call takes the GIL: with a server's event loop holding it, the
    model thread waited a switch interval for every check. Measured with a Python-busy thread
    beside it (compressed, ml-100k, batch 16): a batch took 15.4-16.8 ms with the checks and
    11.5-12.1 ms without. For servers, whose searches last milliseconds and whose signals go to
    the event loop.
    """
    faiss.InterruptCallback.clear_instance()


def build_item_index(embeddings: np.ndarray, spec: IndexSpec, seed: int = 0) -> ItemIndex:
    """Build an index over embeddings [n_items, d] (row i is item index i).

    Example:
        index = build_item_index(item_emb, IndexSpec("ivf_sq8", nprobe=16))
        scores, items = index.search(user_emb, 200)
    """
    xb = np.ascontiguousarray(embeddings, dtype=np.float32)
    n, d = xb.shape
    metric = faiss.METRIC_INNER_PRODUCT
    if spec.kind == "flat":
        index = faiss.IndexFlatIP(d)
    elif spec.kind == "hnsw":
        index = faiss.IndexHNSWFlat(d, spec.hnsw_m, metric)
        index.hnsw.efConstruction = spec.ef_construction
    else:
        nlist = spec.nlist or max(1, min(int(4 * np.sqrt(n)), n // 39 or 1))
        quantizer = faiss.IndexFlatIP(d)
        if spec.kind in SQ_KINDS:
            index = faiss.IndexIVFScalarQuantizer(quantizer, d, nlist, SQ_KINDS[spec.kind], metric)
        else:
            ivf = faiss.IndexIVFPQ(quantizer, d, nlist, spec.pq_m, 8, metric)
            index = faiss.IndexRefineFlat(ivf)  # exact re-scoring of the PQ shortlist
        _train(index, xb, seed)
    index.add(xb)
    return ItemIndex(index, spec)


def _train(index: faiss.Index, xb: np.ndarray, seed: int) -> None:
    ivf = faiss.extract_index_ivf(index)
    ivf.cp.seed = seed
    index.train(xb)


def recall_at_k(approx_ids: np.ndarray, exact_ids: np.ndarray) -> float:
    """Mean |approx ∩ exact| / |exact| per query (faiss contrib's knn intersection measure)."""
    hits = [
        len(np.intersect1d(a[a >= 0], e[e >= 0])) / max(1, (e >= 0).sum())
        for a, e in zip(approx_ids, exact_ids, strict=True)
    ]
    return float(np.mean(hits))


def recall_within(
    found_ids: np.ndarray,
    exact_scores: np.ndarray,
    queries: np.ndarray,
    items: np.ndarray,
    tolerance: float = 1e-3,
) -> float:
    """Share of the k found items whose exact score is within `tolerance` of the exact k-th best.

    ann-benchmarks' recall: an item that ties with the k-th best is as good an answer as it, which
    the set intersection of `recall_at_k` does not see. On a large catalogue hundreds of items can
    lie within 1e-3 of the 200th score (cosine), so which of them exact search lists is an accident
    of the last float digits and of its tie-breaking.
    """
    k = found_ids.shape[1]
    scores = np.einsum("qd,qkd->qk", queries, items[np.maximum(found_ids, 0)])
    good = (found_ids >= 0) & (scores >= exact_scores[:, k - 1 : k] - tolerance)
    return float(good.sum(1).mean() / k)
