"""Run under torchrun by tests/models/test_distributed.py: a few DDP steps on a small dataset.

    torchrun --nproc-per-node=N ddp_worker.py DATA_DIR OUT.safetensors

Trains the tiny retrieval model (in-batch negatives; the last global batch uneven, so
the slices differ in length) and the ranker for one epoch each, without dropout (random
masks would differ between 1 and N processes), and rank 0 writes both models' weights.
"""

from __future__ import annotations

import sys

import torch
from safetensors.torch import save_file
from slimrec.models import distributed
from slimrec.models.device import select_device
from slimrec.models.features import build_feature_space
from slimrec.models.fold import FIT_TRAIN, Fold
from slimrec.models.movielens import load_dataset
from slimrec.models.presets import train_config
from slimrec.models.split import protocol_split
from slimrec.models.train import train_ranker, train_retrieval

STEPS_CONFIG = {
    "two_tower": {"id_dropout": 0.0, "dropout": 0.0},
    "ranker": {"dropout": 0.0},
    # 7 and 5 global batches an epoch here, the last ones uneven (odd sizes)
    "retrieval_schedule": {"batch_size": 301},
    "ranker_schedule": {"batch_size": 45},
}


def main(data: str, out: str) -> None:
    torch.set_num_threads(1)
    # float64: Adam's first steps move each weight by about lr * sign(gradient), so a gradient
    # near zero flips with float32 rounding between 1 and N processes; in float64 it does not.
    torch.set_default_dtype(torch.float64)
    distributed.init_from_env(select_device("cpu"))
    config = train_config("tiny")
    values = config.to_dict()
    for table, changes in STEPS_CONFIG.items():
        values[table] = {**values[table], **changes}
    config = type(config).from_dict(values)
    dataset = load_dataset(data)
    split = protocol_split(dataset)
    fold = Fold.create(FIT_TRAIN, dataset, split, build_feature_space(dataset, config.history_len))
    retrieval = train_retrieval(fold, config, epochs=1).model
    ranker = train_ranker(fold, retrieval, config, epochs=1).model
    if distributed.is_main():
        tensors = {f"retrieval.{k}": v for k, v in retrieval.state_dict().items()}
        tensors |= {f"ranker.{k}": v for k, v in ranker.state_dict().items()}
        save_file({k: v.detach().clone().contiguous() for k, v in tensors.items()}, out)
    distributed.shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:])
