"""Compression: distillation on tiny data, the quality gate, the typed config, and the pipeline end to end."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from slimrec.artifact.features import FeatureSpace
from slimrec.compression.distill import (
    DistillConfig,
    as_new_users,
    ranker_kd_loss,
    retrieval_kd_loss,
    teacher_top_codes,
)
from slimrec.compression.gate import GateConfig, gate
from slimrec.compression.pipeline import PipelineConfig
from slimrec.models.ranker import Ranker, RankerConfig
from slimrec.models.two_tower import TwoTower, TwoTowerConfig

SPACE = FeatureSpace(
    n_users=6,
    n_items=12,
    history_len=4,
    genders=["F", "M"],
    occupations=["a"],
    zip_prefixes=["1"],
    genres=["x", "y"],
)


def tables():
    g = torch.Generator().manual_seed(0)
    return {
        "user_rows": torch.arange(7),
        "item_rows": torch.arange(13),
        "item_genres": torch.randint(0, 2, (13, 2), generator=g).to(torch.uint8),
        "item_year": torch.randint(0, 5, (13,), generator=g),
    }


def batch(n=5):
    g = torch.Generator().manual_seed(1)
    return {
        "user_code": torch.randint(1, 7, (n,), generator=g),
        "user_features": torch.zeros(n, 4, dtype=torch.long),
        "history": torch.randint(0, 13, (n, 4), generator=g),
        "item_code": torch.arange(1, n + 1),
        "log_q": torch.zeros(13),
    }


def test_teacher_top_codes_matches_full_topk_across_chunks():
    u, v = torch.randn(3, 4), torch.randn(50, 4)
    got = teacher_top_codes(u, v, 5, chunk=7).view(3, 5).sort(1).values
    want = ((u @ v.T).topk(5, dim=1).indices + 1).sort(1).values
    assert torch.equal(got, want)
    assert teacher_top_codes(u, v, 0).numel() == 0


@pytest.mark.parametrize("whole_catalogue", [True, False])
def test_retrieval_kd_loss_is_zero_kl_when_student_is_teacher(whole_catalogue, monkeypatch):
    if not whole_catalogue:  # the candidate-set path of large catalogues
        monkeypatch.setattr("slimrec.compression.distill.FULL_SOFTMAX_MAX_ITEMS", 5)
    torch.manual_seed(0)
    teacher = TwoTower(
        TwoTowerConfig(
            id_dim=4,
            feature_dim=2,
            user_hidden=(8,),
            item_hidden=(8,),
            out_dim=4,
            dropout=0.0,
            id_dropout=0.0,
        ),
        SPACE,
        tables(),
    ).eval()
    kd_only = retrieval_kd_loss(
        teacher,
        DistillConfig(
            label_weight=0.0, teacher_candidates=3, teacher_precision="fp32", history_only_fraction=0.0
        ),
    )
    # The student is the teacher itself: both score distributions coincide, so KL = 0.
    assert kd_only(teacher, batch()).item() == pytest.approx(0.0, abs=1e-6)
    labels_only = retrieval_kd_loss(teacher, DistillConfig(label_weight=1.0, history_only_fraction=0.0))
    b = {k: v for k, v in batch().items() if k != "log_q"}
    expected = teacher.full_softmax_loss(**b) if whole_catalogue else teacher.in_batch_loss(**batch())
    assert labels_only(teacher, batch()).item() == pytest.approx(expected.item(), rel=1e-6)


def test_as_new_users_hides_id_and_features_keeps_history():
    inputs = {**batch(8), "user_features": torch.ones(8, 4, dtype=torch.long)}
    unknown = torch.tensor([0, 0, 0, 0])
    assert as_new_users(inputs, 0.0, unknown) is inputs
    hidden = as_new_users(inputs, 1.0, unknown)
    assert (hidden["user_code"] == 0).all() and (hidden["user_features"] == 0).all()
    assert torch.equal(hidden["history"], inputs["history"])
    torch.manual_seed(0)
    half = as_new_users(inputs, 0.5, unknown)
    gone = half["user_code"] == 0
    assert 0 < gone.sum() < 8  # some rows hidden, others kept whole
    assert (half["user_features"][gone] == 0).all() and (half["user_features"][~gone] == 1).all()
    assert (half["user_code"][~gone] == inputs["user_code"][~gone]).all()


def test_retrieval_kd_pulls_a_student_towards_the_teacher():
    torch.manual_seed(0)
    cfg = dict(feature_dim=2, dropout=0.0, id_dropout=0.0)
    teacher = TwoTower(
        TwoTowerConfig(id_dim=8, user_hidden=(16,), item_hidden=(16,), out_dim=8, **cfg), SPACE, tables()
    ).eval()
    student = TwoTower(
        TwoTowerConfig(id_dim=4, user_hidden=(8,), item_hidden=(8,), out_dim=4, **cfg), SPACE, tables()
    )
    loss_fn = retrieval_kd_loss(teacher, DistillConfig(label_weight=0.0, teacher_candidates=4))
    opt = torch.optim.Adam(student.parameters(), lr=0.05)
    first = loss_fn(student, batch()).item()
    for _ in range(60):
        opt.zero_grad()
        loss = loss_fn(student, batch())
        loss.backward()
        opt.step()
    assert loss.item() < 0.5 * first


def test_ranker_kd_loss_mixes_labels_and_teacher():
    torch.manual_seed(0)
    teacher = Ranker(
        RankerConfig(id_dim=4, feature_dim=2, n_cross=1, deep=(8,), dropout=0.0), SPACE, tables()
    )
    student = Ranker(
        RankerConfig(id_dim=4, feature_dim=2, n_cross=1, cross_rank=2, deep=(4,)), SPACE, tables()
    )
    inputs = {k: v for k, v in batch().items() if k not in ("item_code", "log_q")}
    inputs["candidates"] = torch.randint(0, 13, (5, 3))
    labels = torch.zeros(5, 3)
    labels[:, 0] = 1
    mask = inputs["candidates"] > 0
    only_labels = ranker_kd_loss(teacher, DistillConfig(label_weight=1.0, history_only_fraction=0.0))(
        student, inputs, labels, mask
    )
    expected = torch.nn.functional.binary_cross_entropy_with_logits(student(**inputs)[mask], labels[mask])
    assert only_labels.item() == pytest.approx(expected.item(), rel=1e-6)
    mixed = ranker_kd_loss(teacher, DistillConfig(label_weight=0.3))
    assert torch.isfinite(mixed(student, inputs, labels, mask))
    # The teacher's soft labels under bfloat16 autocast stay close to its float32 ones.
    kd = {
        p: ranker_kd_loss(teacher, DistillConfig(label_weight=0.0, teacher_precision=p))
        for p in ("fp32", "bf16")
    }
    student.eval()
    assert kd["bf16"](student, inputs, labels, mask).item() == pytest.approx(
        kd["fp32"](student, inputs, labels, mask).item(), rel=1e-2
    )


def metrics(ndcg, recall):
    return {"two_stage": {"valid": {"ndcg@10": ndcg, "recall@200": recall}}}


def test_gate_passes_within_tolerance_and_names_each_failing_metric():
    teacher = metrics(0.170, 0.740)
    assert gate(teacher, metrics(0.1670, 0.730), GateConfig(tolerance=0.02)) == []
    failures = gate(teacher, metrics(0.1650, 0.700), GateConfig(tolerance=0.02))
    assert len(failures) == 2
    assert all(part in failures[0] for part in ("ndcg@10", "0.1650", "0.1700", "0.02"))
    assert "recall@200" in failures[1]
    assert gate(teacher, metrics(0.1699, 0.74), GateConfig(tolerance=0.0)) != []


def test_configs_reject_bad_values_and_unknown_sections():
    with pytest.raises(ValueError, match="label_weight"):
        DistillConfig(label_weight=1.5)
    with pytest.raises(ValueError, match="history_only_fraction"):
        DistillConfig(history_only_fraction=-0.1)
    with pytest.raises(ValueError, match="teacher_precision"):
        DistillConfig(teacher_precision="fp16")
    with pytest.raises(ValueError, match="tolerance"):
        GateConfig(tolerance=1.0)
    with pytest.raises(ValueError, match="unknown section"):
        PipelineConfig.from_dict({"quantise": {}})
    with pytest.raises(ValueError, match="type"):
        PipelineConfig.from_dict({"prune": {"type": "DistillConfig"}})
    with pytest.raises(ValueError, match=r"\[prune\]"):
        PipelineConfig.from_dict({"prune": {"keep_fraction_typo": 0.5}})
    config = PipelineConfig()
    assert PipelineConfig.from_dict(json.loads(json.dumps(config.to_dict()))).to_dict() == config.to_dict()


@pytest.fixture(scope="session")
def tiny_compressed(tmp_path_factory, tiny_teacher):
    from slimrec.cli import main

    out = tmp_path_factory.mktemp("compressed") / "compressed"
    code = main(
        ["compress", "--teacher", str(tiny_teacher), "--out", str(out), "--preset", "tiny", "--threads", "2"]
    )
    return out, code


@pytest.mark.slow
def test_pipeline_end_to_end_on_ml100k(tiny_compressed, tiny_teacher):
    from slimrec.artifact import load_artifact

    out, code = tiny_compressed
    art = load_artifact(out)  # every checksum verified
    report = json.loads((out / "report.json").read_text())
    assert [r["stage"] for r in report["rows"]] == ["teacher", "student", "pruned", "int8", "compressed"]
    # The exit code and the manifest say what the gate said.
    assert art.manifest["promotable"] is report["gate"]["promotable"]
    assert code == (0 if report["gate"]["promotable"] else 1)
    rows = {r["stage"]: r for r in report["rows"]}
    assert rows["compressed"]["model_bytes"] < rows["teacher"]["model_bytes"]
    assert rows["int8"]["parts"]["ranker"] < rows["pruned"]["parts"]["ranker"]  # int8 really shrinks the file
    assert rows["compressed"]["index"]["kind"] == "ivf_sq8"
    assert 0 < rows["compressed"]["index_recall@200"] <= 1
    for r in report["rows"]:
        for fold in ("valid", "test"):
            assert set(r["two_stage"][fold]) >= {"ndcg@10", "recall@200"}
        assert r["total_p50_ms"] > 0 and r["requests"] >= 200
    assert (out / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    stages = out.with_name(out.name + ".stages")
    for stage in ("student", "pruned", "int8"):
        load_artifact(stages / stage)
    # The pruned student really is smaller than the distilled one.
    params = {s: load_artifact(stages / s).config["models"][""]["parameters"] for s in ("student", "pruned")}
    assert params["pruned"]["ranker"] < params["student"]["ranker"]
    assert params["pruned"]["user_tower"] < params["student"]["user_tower"]


@pytest.mark.slow
def test_failed_gate_exits_nonzero_and_marks_manifest(tiny_compressed, tmp_path, capsys):
    from slimrec.artifact import load_artifact

    out, code = tiny_compressed
    art = load_artifact(out)
    if art.manifest["promotable"]:
        pytest.skip("the tiny student passed the gate; the failing path is covered by test_gate_*")
    assert code == 1
    assert "promotable" in (out / "report.md").read_text()


def test_shared_copy_of_tiny_teacher_is_not_modified(tiny_teacher):
    from slimrec.artifact import load_artifact

    load_artifact(tiny_teacher)  # still verifies after compression read it
    recorded = json.loads((tiny_teacher / "metrics.json").read_text())
    assert np.isfinite(recorded["two_stage"]["test"]["ndcg@10"])


def test_teacher_cache_reuses_the_first_epochs_teacher_outputs():
    torch.manual_seed(0)
    teacher = TwoTower(
        TwoTowerConfig(
            id_dim=4,
            feature_dim=2,
            user_hidden=(8,),
            item_hidden=(8,),
            out_dim=4,
            dropout=0.0,
            id_dropout=0.0,
        ),
        SPACE,
        tables(),
    ).eval()
    student = TwoTower(
        TwoTowerConfig(
            id_dim=4,
            feature_dim=2,
            user_hidden=(8,),
            item_hidden=(8,),
            out_dim=4,
            dropout=0.0,
            id_dropout=0.0,
        ),
        SPACE,
        tables(),
    ).eval()
    loss_fn = retrieval_kd_loss(
        teacher,
        DistillConfig(
            label_weight=0.0, teacher_candidates=3, teacher_precision="fp32", history_only_fraction=0.0
        ),
    )
    inputs = {**batch(), "rows": torch.arange(5)}
    first = loss_fn(student, inputs).item()

    def frozen(*args):
        raise AssertionError("teacher recomputed for cached rows")

    teacher.user_tower.forward = frozen
    assert loss_fn(student, inputs).item() == pytest.approx(first, rel=1e-6)


def test_student_ranker_starts_as_the_teachers_when_it_is_the_students_size(tiny_teacher, ml100k):
    from slimrec.artifact import load_artifact
    from slimrec.compression.distill import ranker_from_teacher, teacher_ranker_stage
    from slimrec.models.evaluate import evaluate_ranked, retrieve_candidates
    from slimrec.models.fold import FIT_TRAIN, Fold
    from slimrec.models.package import SELECTION_PREFIX, read_teacher
    from slimrec.models.split import protocol_split

    art = load_artifact(tiny_teacher)
    space = FeatureSpace.from_dict(art.config["feature_space"])
    fold = Fold.create(FIT_TRAIN, ml100k, protocol_split(ml100k), space)
    train_config, two_tower, ranker = read_teacher(art, SELECTION_PREFIX, fold)
    same = DistillConfig(student_ranker=ranker.config)
    other = RankerConfig(id_dim=4, feature_dim=2, n_cross=1, deep=(8,))
    assert ranker_from_teacher(ranker, same)
    trained_otherwise = replace(ranker.config, dropout=0.3, new_user_dropout=0.2)  # same weights' shapes
    assert ranker_from_teacher(ranker, DistillConfig(student_ranker=trained_otherwise))
    assert not ranker_from_teacher(ranker, DistillConfig(student_ranker=other))  # "auto": a smaller student
    assert not ranker_from_teacher(ranker, DistillConfig(student_ranker=ranker.config, ranker_init="scratch"))
    with pytest.raises(ValueError, match="needs student_ranker of the teacher's ranker's architecture"):
        ranker_from_teacher(ranker, DistillConfig(student_ranker=other, ranker_init="teacher"))
    with pytest.raises(ValueError, match="ranker_init"):
        DistillConfig(ranker_init="copy")

    # Selection fold: a copy of the teacher's ranker, the blend weight chosen on validation.
    weights = (0.0, 1.6, 6.4)
    result = teacher_ranker_stage(ranker, two_tower, fold, train_config, weights)
    assert result.model is not ranker and result.epochs == 0
    by_weight = evaluate_ranked(
        ranker, fold, retrieve_candidates(two_tower, fold, train_config.ranker_data.candidates), weights
    )
    best = max(by_weight, key=lambda w: by_weight[w]["ndcg@10"])
    assert result.history[-1]["retrieval_weight"] == best
    assert result.history[0]["valid"]["ndcg@10"] == pytest.approx(by_weight[best]["ndcg@10"])
    inputs = {
        "user_code": torch.tensor([1, 2]),
        "user_features": torch.zeros(2, 4, dtype=torch.long),
        "history": torch.tensor([[0] * (space.history_len - 2) + [5, 9]] * 2),
        "candidates": torch.tensor([[1, 2, 3], [4, 5, 6]]),
    }
    with torch.no_grad():
        assert torch.equal(result.model(**inputs), ranker(**inputs))
    # Final fold: the weight given, nothing scored (its held-out rows are the test set).
    fixed = teacher_ranker_stage(ranker, two_tower, fold, train_config, (best,))
    assert fixed.history == [{"retrieval_weight": best}] and fixed.times == {}
