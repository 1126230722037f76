"""`PipelineConfig`: every stage's config of `slimrec compress`, serialised with type and version tags.

Unknown sections, keys or type tags are errors at load, not ignored (torchao `config_to_dict`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from slimrec.compression.distill import DistillConfig
from slimrec.compression.gate import GateConfig
from slimrec.compression.prune import PruneConfig
from slimrec.compression.quantize_embeddings import EmbeddingQuantConfig
from slimrec.compression.quantize_onnx import OnnxQuantConfig
from slimrec.compression.tune_index import IndexTuning
from slimrec.models.epochs import StageSchedule


@dataclass
class PipelineConfig:
    version: int = 1
    seed: int = 0
    distill: DistillConfig = field(default_factory=DistillConfig)
    prune: PruneConfig = field(default_factory=PruneConfig)
    finetune: StageSchedule = field(
        default_factory=lambda: StageSchedule(max_epochs=2, batch_size=256, lr=1e-3, patience=1)
    )
    finetune_ranker: StageSchedule = field(
        default_factory=lambda: StageSchedule(max_epochs=1, batch_size=128, lr=1e-3, patience=1)
    )
    embeddings: EmbeddingQuantConfig = field(default_factory=EmbeddingQuantConfig)
    dense: OnnxQuantConfig = field(default_factory=OnnxQuantConfig)
    index: IndexTuning = field(default_factory=IndexTuning)
    gate: GateConfig = field(default_factory=GateConfig)

    SECTIONS = {
        "distill": DistillConfig,
        "prune": PruneConfig,
        "finetune": StageSchedule,
        "finetune_ranker": StageSchedule,
        "embeddings": EmbeddingQuantConfig,
        "dense": OnnxQuantConfig,
        "index": IndexTuning,
        "gate": GateConfig,
    }

    def __post_init__(self):
        if self.version != 1:
            raise ValueError(f"PipelineConfig.version {self.version} is not supported (expected 1)")

    def to_dict(self) -> dict:
        out = {"type": "PipelineConfig", "version": self.version, "seed": self.seed}
        for name, cls in self.SECTIONS.items():
            section = getattr(self, name)
            values = section.to_dict() if hasattr(section, "to_dict") else asdict(section)
            out[name] = {"type": cls.__name__, **{k: v for k, v in values.items() if not callable(v)}}
        return out

    @classmethod
    def from_dict(cls, d: dict) -> PipelineConfig:
        """Inverse of to_dict; unknown sections, keys or type tags are errors, not ignored."""
        d = dict(d)
        if d.pop("type", "PipelineConfig") != "PipelineConfig":
            raise ValueError("compress config: top-level type must be PipelineConfig")
        unknown = set(d) - set(cls.SECTIONS) - {"version", "seed"}
        if unknown:
            raise ValueError(
                f"compress config: unknown section(s) {sorted(unknown)}; expected {sorted(cls.SECTIONS)}"
            )
        kwargs = {k: d[k] for k in ("version", "seed") if k in d}
        for name, section_cls in cls.SECTIONS.items():
            if name not in d:
                continue
            values = dict(d[name])
            values.pop("calibration_feeds", None)  # a count written by OnnxQuantConfig.to_dict, not an input
            tag = values.pop("type", section_cls.__name__)
            if tag != section_cls.__name__:
                raise ValueError(
                    f"compress config: [{name}] has type {tag!r}, expected {section_cls.__name__!r}"
                )
            try:
                kwargs[name] = section_cls(**values)
            except TypeError as exc:
                raise ValueError(f"compress config: [{name}]: {exc}") from None
        return cls(**kwargs)
