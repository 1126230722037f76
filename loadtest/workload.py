"""What the load generator asks for: ids to draw from, Zipf-skewed samplers, the request mix.

Standard library only: the locustfile imports this on every load-generator process, and the
runner imports it without pulling in locust (whose gevent monkey-patching would change the
runner's subprocess and thread handling). Nothing here knows the server; ids come from an
artifact's `catalogue.json` (raw ids, titles, genres) or a workload file written from one.
"""

from __future__ import annotations

import bisect
import itertools
import json
import random
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

WORKLOAD_FORMAT = 1
DEFAULT_K_MIX = "10:70,20:15,50:10,100:5"


@dataclass
class Workload:
    """Ids the generator may use: known users (every ML-100K user has test interactions), items, genres."""

    user_ids: list[str]
    item_ids: list[str]
    genres: list[str] = field(default_factory=list)
    source: str = ""

    def __post_init__(self):
        if not self.user_ids or not self.item_ids:
            raise ValueError(f"workload from {self.source or '?'}: no user ids or no item ids")

    def to_dict(self) -> dict:
        return {
            "format": WORKLOAD_FORMAT,
            "source": self.source,
            "user_ids": self.user_ids,
            "item_ids": self.item_ids,
            "genres": self.genres,
        }

    def save(self, path: Path) -> Path:
        path.write_text(json.dumps(self.to_dict()))
        return path

    @classmethod
    def load(cls, path: str | Path) -> Workload:
        data = json.loads(Path(path).read_text())
        if data.get("format") != WORKLOAD_FORMAT:
            raise ValueError(f"{path}: workload format {data.get('format')!r}, expected {WORKLOAD_FORMAT}")
        return cls(
            [str(u) for u in data["user_ids"]],
            [str(i) for i in data["item_ids"]],
            list(data.get("genres", [])),
            data.get("source", str(path)),
        )

    @classmethod
    def from_catalogue(cls, path: str | Path, genres: list[str] | None = None) -> Workload:
        """From an artifact directory or its catalogue.json; `genres` (the server's) win over the file's."""
        path = Path(path)
        if path.is_dir():
            path = path / "catalogue.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no catalogue.json (pass an artifact directory or the file)")
        data = json.loads(path.read_text())
        if genres is None:
            genres = sorted({g for text in data.get("genres", []) for g in text.split("|") if g})
        return cls(
            [str(u) for u in data["user_ids"]],
            [str(i) for i in data["item_ids"]],
            [g for g in genres if g != "unknown"],
            str(path),
        )


def workload_from_server(url: str, timeout_s: float = 10.0) -> Workload:
    """Read GET /v1/variants, then the catalogue of the first variant whose artifact path is readable here.

    The server lists genres but not user ids, so this works when the server runs on this machine
    (its artifact paths are readable); otherwise write a workload file from the catalogue.
    """
    listing = get_json(f"{url.rstrip('/')}/v1/variants", timeout_s)
    genre_sets = [set(v.get("genres", [])) for v in listing["variants"]]
    genres = sorted(set.intersection(*genre_sets)) if genre_sets else None
    tried = []
    for variant in listing["variants"]:
        catalogue = Path(variant["path"]) / "catalogue.json"
        if catalogue.is_file():
            return Workload.from_catalogue(catalogue, genres)
        tried.append(str(catalogue))
    raise FileNotFoundError(
        f"{url} serves artifacts not readable here ({', '.join(tried)}); "
        "pass the catalogue (--catalogue ARTIFACT_DIR)"
    )


def get_json(url: str, timeout_s: float = 10.0) -> dict:
    with urllib.request.urlopen(url, timeout=timeout_s) as response:  # noqa: S310 (http URL given by the user)
        return json.loads(response.read())


class ZipfSampler:
    """Draws ids with P(rank r) proportional to 1 / r**exponent, ranks a seeded shuffle of the ids.

    The shuffle keeps popularity unrelated to id order; the same seed gives every generator
    process the same popular ids, so distributed workers skew towards the same users.

    Example:
        >>> s = ZipfSampler(["a", "b", "c"], exponent=1.0, seed=0)
        >>> s.sample(random.Random(1)) in {"a", "b", "c"}
        True
    """

    def __init__(self, ids: list[str], exponent: float = 1.0, seed: int = 0):
        if not ids:
            raise ValueError("ZipfSampler needs at least one id")
        if exponent < 0:
            raise ValueError(f"Zipf exponent must be >= 0, got {exponent}")
        self.ids = list(ids)
        random.Random(seed).shuffle(self.ids)
        self.cum_weights = list(itertools.accumulate(1.0 / (r + 1) ** exponent for r in range(len(self.ids))))

    def sample(self, rng: random.Random) -> str:
        point = rng.random() * self.cum_weights[-1]
        return self.ids[min(bisect.bisect_right(self.cum_weights, point), len(self.ids) - 1)]

    def probability(self, rank: int) -> float:
        """P(the id at popularity rank `rank`, 0-based)."""
        previous = self.cum_weights[rank - 1] if rank else 0.0
        return (self.cum_weights[rank] - previous) / self.cum_weights[-1]


def parse_k_mix(text: str) -> tuple[list[int], list[float]]:
    """'10:70,20:15,50:10,100:5' -> ([10, 20, 50, 100], [70, 15, 10, 5]); ValueError naming the bad part."""
    ks, weights = [], []
    for part in text.split(","):
        k, sep, weight = part.strip().partition(":")
        try:
            ks.append(int(k))
            weights.append(float(weight) if sep else 1.0)
        except ValueError:
            raise ValueError(f"k mix: expected K:WEIGHT[,K:WEIGHT...], got {part!r}") from None
        if ks[-1] < 1 or weights[-1] < 0:
            raise ValueError(f"k mix: k must be >= 1 and weights >= 0, got {part!r}")
    if sum(weights) <= 0:
        raise ValueError(f"k mix: weights sum to 0 in {text!r}")
    return ks, weights


@dataclass
class RequestMix:
    """How one simulated request is drawn; shares are probabilities in [0, 1]."""

    new_user_share: float = 0.2
    genre_share: float = 0.1
    k_mix: str = DEFAULT_K_MIX
    history_len: tuple[int, int] = (1, 20)

    def __post_init__(self):
        for name in ("new_user_share", "genre_share"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be within [0, 1], got {getattr(self, name)}")
        self.ks, self.k_weights = parse_k_mix(self.k_mix)

    def draw(
        self, rng: random.Random, workload: Workload, users: ZipfSampler, items: ZipfSampler
    ) -> tuple[str, dict]:
        """One request body for POST /v1/recommend and its kind ("known", "new-user" or "genre")."""
        k = rng.choices(self.ks, self.k_weights)[0]
        if rng.random() < self.new_user_share:
            # A user the model has never seen, scored from the items sent (Zipf-popular, like real histories).
            history = [items.sample(rng) for _ in range(rng.randint(*self.history_len))]
            return "new-user", {"user_id": f"lt-new-{rng.getrandbits(40):x}", "k": k, "history": history}
        body = {"user_id": users.sample(rng), "k": k}
        if workload.genres and rng.random() < self.genre_share:
            key = "include_genres" if rng.random() < 0.75 else "exclude_genres"
            body[key] = [rng.choice(workload.genres)]
            return "genre", body
        return "known", body
