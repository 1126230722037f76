"""Training on several processes (DDP under torchrun, gloo on loopback) matches one process.

The processes are real: torchrun starts them on 127.0.0.1, each test waits a bounded time
and, past it, stops the whole process group it started.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from slimrec.models import distributed
from slimrec.models.distributed import free_port
from slimrec.models.synth import write_synthetic

WORKER = Path(__file__).with_name("ddp_worker.py")
TIMEOUT_S = 300


@pytest.fixture(scope="module")
def small_data(tmp_path_factory) -> Path:
    """60 users, 150 items, 3,000 interactions: a few global batches per epoch."""
    return write_synthetic(
        tmp_path_factory.mktemp("ddp") / "synth", n_items=150, n_users=60, n_interactions=3000, seed=0
    )


def run_bounded(command: list[str], log: Path) -> int:
    """Run `command` in its own process group; past TIMEOUT_S, kill that group (torchrun's workers too)."""
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}
    with log.open("w") as out:
        process = subprocess.Popen(
            command, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        try:
            return process.wait(timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            raise


def torchrun(nproc: int, *args: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc-per-node={nproc}",
        "--rdzv-backend=c10d",
        f"--rdzv-endpoint=127.0.0.1:{free_port()}",
        *args,
    ]


def test_two_processes_train_the_same_weights_as_one(small_data, tmp_path):
    weights = {}
    for nproc in (1, 2):
        out, log = tmp_path / f"{nproc}.safetensors", tmp_path / f"{nproc}.log"
        rc = run_bounded(torchrun(nproc, str(WORKER), str(small_data), str(out)), log)
        assert rc == 0, log.read_text()[-3000:]
        weights[nproc] = load_file(out)
    one, two = weights[1], weights[2]
    assert one.keys() == two.keys() and any(k.startswith("ranker.") for k in one)
    for name in one:
        torch.testing.assert_close(two[name], one[name], atol=1e-4, rtol=0, msg=name)


def test_slimrec_train_nproc_2_writes_a_loadable_artifact(small_data, tmp_path):
    from slimrec.artifact import load_artifact

    out, log = tmp_path / "teacher", tmp_path / "train.log"
    command = [sys.executable, "-m", "slimrec.cli", "train", "--nproc", "2", "--preset", "tiny"]
    rc = run_bounded([*command, "--data", str(small_data), "--out", str(out)], log)
    assert rc == 0, log.read_text()[-3000:]
    artifact = load_artifact(out)  # verifies every file's sha256
    assert artifact.config["processes"] == 2
    assert artifact.config["device"] == {"type": "cpu"}
    metrics = json.loads((out / "metrics.json").read_text())
    assert 0 < metrics["two_stage"]["test"]["ndcg@10"] <= 1
    assert not out.with_name("teacher.checkpoints").exists()


def test_local_slices_tile_a_batch(monkeypatch):
    for size in (1, 2, 3):
        monkeypatch.setattr(distributed, "world_size", lambda size=size: size)
        for n in (0, 1, 5, 301):
            parts = []
            for r in range(size):
                monkeypatch.setattr(distributed, "rank", lambda r=r: r)
                parts.extend(range(n)[distributed.local_slice(n)])
            assert parts == list(range(n))


def test_one_process_is_a_world_of_one():
    x = torch.arange(6.0).view(3, 2)
    rows, offset = distributed.gather_rows(x)
    assert rows is x and offset == 0
    assert torch.equal(distributed.global_mean(x.mean(), 3), x.mean())
    assert distributed.world_size() == 1 and distributed.is_main()
    assert distributed.local_slice(7) == slice(0, 7)


def test_nnodes_without_endpoint_is_refused():
    with pytest.raises(ValueError, match="--rdzv-endpoint"):
        distributed.torchrun_command(["train"], 2, 2, 0, None)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
@pytest.mark.parametrize("command", [["train", "--preset", "tiny"], ["compress", "--teacher", "unused"]])
def test_device_cuda_without_a_gpu_is_a_clear_error(command, capsys):
    from slimrec.cli import main

    assert main([*command, "--device", "cuda", "--out", "unused"]) == 2
    assert "--device cuda: torch sees no CUDA device" in capsys.readouterr().err


def test_device_names_are_checked():
    from slimrec.models.device import resolve_device

    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="'gpu': choose one of auto, cpu, cuda"):
        resolve_device("gpu")
