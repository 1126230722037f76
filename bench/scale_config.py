"""How `slimrec bench --catalogue` trains, compresses and tunes the models of each size."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace


@dataclass
class ScaleConfig:
    """How the models of each size are trained and the compressed index tuned.

    Args:
        preset: "default" (the teacher of `slimrec train`, the student of `slimrec compress`)
            or "tiny" (the test presets).
        train_interactions: fitted interactions one retrieval epoch samples; None = all.
        ranker_users, cut_points: one ranker epoch's lists (RankerData.max_users, cut_points).
            Every stage keeps its preset's batch size and learning rate, for one epoch.
        retrieval_weights: the blend weights of the retrieval score tried for each variant; the
            one with the best two-stage NDCG@10 on the tuning users is kept. One short epoch
            leaves the ranker weaker than retrieval (100k, 2,000 test users, the teacher's
            recall@10: ranker alone 0.013, retrieval alone 0.057), so the weight that suits a
            fully trained ranker (0.4) is far from the best (3.2: 0.060; 0.4: 0.045).
        embedding_min_count: the compressed variant's pruning at scale: users and items with fewer
            fitted interactions share the fallback id row (`share_rare_rows_`) and embed from
            their side features and history. A Zipf catalogue's tail is most of its id table
            and barely trained; 0 keeps every row. (The hidden-unit pruning of `slimrec
            compress` needs a fine-tuning pass that the one-epoch scale training skips.)
        index_kind: the compressed variant's IVF code ("ivf_sq8", "ivf_sq6" or "ivf_sq4"). SQ6 by
            default: on the 1M catalogue its recall@200 at nprobe 16 was that of SQ8 (0.9976 vs
            0.9977) in three quarters of the bytes, and the index is the compressed variant's
            largest resident part there; SQ4 lost 0.0035 more.
        target_recall, nprobe_grid: the IVF tuning (smallest nprobe reaching the target).
        recall_tolerance: a found item within this of the exact K-th best score counts as a hit
            (`slimrec.artifact.index.recall_within`); the strict set intersection is reported beside it.
        tune_users, recall_users: disjoint samples of test users: tuning, then the reported recall.
        train_threads: torch and FAISS threads while building (0 = all CPUs). 1 by default: on a
            shared 2-vCPU host, two OpenMP threads that spin at every barrier while the other is
            descheduled trained the tiny models 12x slower than one.
    """

    preset: str = "default"
    train_interactions: int | None = 250_000
    ranker_users: int = 2_000
    cut_points: int = 2
    retrieval_weights: tuple[float, ...] = (0.0, 0.2, 0.4, 0.8, 1.6, 3.2, 6.4)
    embedding_min_count: int = 10
    index_kind: str = "ivf_sq6"
    target_recall: float = 0.97
    recall_tolerance: float = 1e-3
    nprobe_grid: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
    tune_users: int = 500
    recall_users: int = 1000
    train_threads: int = 1
    seed: int = 0

    def __post_init__(self):
        from slimrec.artifact.index import SQ_KINDS

        self.nprobe_grid = tuple(self.nprobe_grid)
        self.retrieval_weights = tuple(self.retrieval_weights)
        if self.preset not in ("default", "tiny"):
            raise ValueError(f"unknown preset {self.preset!r}; expected 'default' or 'tiny'")
        if not self.retrieval_weights or min(self.retrieval_weights) < 0:
            raise ValueError(f"retrieval_weights must be non-empty and >= 0, got {self.retrieval_weights}")
        if self.embedding_min_count < 0:
            raise ValueError(f"embedding_min_count must be >= 0, got {self.embedding_min_count}")
        if self.index_kind not in SQ_KINDS:
            raise ValueError(f"unknown index_kind {self.index_kind!r}; expected one of {tuple(SQ_KINDS)}")
        if not 0 < self.target_recall <= 1:
            raise ValueError(f"target_recall must be in (0, 1], got {self.target_recall}")

    @classmethod
    def for_preset(cls, preset: str, **overrides) -> ScaleConfig:
        """The preset's settings; overrides that are None keep them."""
        base = (
            {}
            if preset == "default"
            else {
                "train_interactions": None,
                "ranker_users": 300,
                "cut_points": 1,
                "tune_users": 100,
                "recall_users": 200,
                "nprobe_grid": (1, 4, 16, 64),
            }
        )
        return cls(preset=preset, **{**base, **{k: v for k, v in overrides.items() if v is not None}})

    def to_dict(self) -> dict:
        return asdict(self)

    def train_config(self):
        from slimrec.models.presets import train_config

        config = train_config("teacher" if self.preset == "default" else "tiny", seed=self.seed)
        config.retrieval_schedule = replace(config.retrieval_schedule, max_epochs=1)
        config.ranker_schedule = replace(config.ranker_schedule, max_epochs=1)
        config.ranker_data = replace(
            config.ranker_data, cut_points=self.cut_points, max_users=self.ranker_users
        )
        return config

    def distill_config(self):
        from slimrec.compression.presets import compress_config

        distill = compress_config("default" if self.preset == "default" else "tiny").distill
        # One epoch over a sample leaves most id rows as initialised, N(0, 1): random directions
        # that no trained model has and that an IVF cannot cluster. The teacher preset's
        # decoupled weight decay pulls the rows a short run never visits towards 0, so those
        # items embed from their side features; the student gets the same decay here.
        decay = self.train_config().retrieval_schedule.weight_decay
        # The student ranker is distilled over the student's own candidates, never a copy of the
        # teacher's: the teacher's ranker learned to order the teacher's top 200 and, without the
        # fine-tuning pass `slimrec compress` gives it, put the student's candidates in nearly
        # random order (100k, 2,000 test users, student two-stage recall@10 at the best blend
        # weight: 0.037 copied, 0.042 distilled; the ranker alone: 0.003 vs 0.011).
        return replace(
            distill,
            ranker_init="scratch",
            teacher_candidates=0,
            retrieval_schedule=replace(distill.retrieval_schedule, max_epochs=1, weight_decay=decay),
            ranker_schedule=replace(distill.ranker_schedule, max_epochs=1),
        )

    def index_tuning(self):
        """The compressed index's tuning, as `slimrec compress` states it."""
        from slimrec.compression.tune_index import IndexTuning

        return IndexTuning(
            kind=self.index_kind, target_recall=self.target_recall, nprobe_grid=self.nprobe_grid
        )
