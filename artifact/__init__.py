"""The artifact contract: the directory format, its writer and loader, and the model as served.

Arrows: training and compression write artifacts, serving and the benchmarks read them; this
package imports none of them, and never torch (numpy, safetensors, ONNX Runtime and FAISS only).
"""

from slimrec.artifact.amend import amend_artifact, update_metrics
from slimrec.artifact.load import Artifact, load_artifact
from slimrec.artifact.manifest import ArtifactError, sha256_file
from slimrec.artifact.writer import ArtifactWriter

__all__ = [
    "Artifact",
    "ArtifactError",
    "ArtifactWriter",
    "amend_artifact",
    "load_artifact",
    "sha256_file",
    "update_metrics",
]
