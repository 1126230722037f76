"""Bad artifacts: refused at load naming the file and the problem; reloads under steady load.

Every artifact file is checked against the manifest's sha256 before use, then the ONNX
graphs' signatures and the lookup tables against what serving feeds and expects. During a
~5 s bounded request stream, a variant is reloaded with (a) a good new artifact, (b) corrupt
ones, (c) a `promotable: false` one: zero failed requests, (a) swaps, the others are refused
with the old model serving on, and /metrics counts each outcome.
"""

from __future__ import annotations

import ast
import json
import re
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import safetensors.numpy
from fake_models import fake_ranker_without_candidates, fake_user_tower
from onnx import TensorProto
from serving_fixtures import ADMIN_TOKEN, copy_artifact, metric_value, running_server
from slimrec.artifact import ArtifactError, amend_artifact, load_artifact
from slimrec.serving.variants import load_variant

AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
SERVED_FILES = ["user_tower.onnx", "ranker.onnx", "items.faiss", "tables.safetensors", "catalogue.json"]


@pytest.fixture(scope="module")
def shape(tiny_teacher):
    config = load_artifact(tiny_teacher, verify=False).config
    space, index = config["feature_space"], config["models"][""]
    return {
        "n_users": space["n_users"],
        "history_len": space["history_len"],
        "dim": index.get("embedding_dim") or 16,
    }


def refused(path: Path) -> str:
    with pytest.raises(ArtifactError) as caught:
        load_variant("full", path)
    return str(caught.value)


# --- refused at load, naming the file and the problem ------------------------------------------------


@pytest.mark.parametrize("name", SERVED_FILES)
def test_tampered_truncated_or_missing_files_are_refused(tiny_teacher, tmp_path, name):
    tampered = copy_artifact(tiny_teacher, tmp_path / "tampered")
    data = bytearray((tampered / name).read_bytes())
    data[len(data) // 2] ^= 0x01  # same size: only the sha256 can tell
    (tampered / name).write_bytes(bytes(data))
    assert re.search(rf"tampered/{re.escape(name)}: checksum mismatch", refused(tampered))

    truncated = copy_artifact(tiny_teacher, tmp_path / "truncated")
    (truncated / name).write_bytes((truncated / name).read_bytes()[:-7])
    assert re.search(rf"truncated/{re.escape(name)}: size mismatch \(truncated\)", refused(truncated))

    missing = copy_artifact(tiny_teacher, tmp_path / "missing")
    (missing / name).unlink()
    assert re.search(rf"missing/{re.escape(name)}: missing \(listed in manifest.json\)", refused(missing))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"format_version": 2}, "unsupported format_version 2"),
        ({"format_version": "1"}, "unsupported format_version '1'"),
        ({"format": "pickle"}, "format is 'pickle'"),
        (
            {"files": {"../etc/passwd": {"sha256": "0" * 64, "bytes": 1, "role": "served"}}},
            "escapes the artifact",
        ),
    ],
)
def test_bad_manifests_are_refused(tiny_teacher, tmp_path, change, message):
    bad = copy_artifact(tiny_teacher, tmp_path / "bad")
    manifest = json.loads((bad / "manifest.json").read_text())
    manifest.update(change)
    (bad / "manifest.json").write_text(json.dumps(manifest))
    error = refused(bad)
    assert "bad/manifest.json" in error and message in error


def test_unparseable_or_missing_manifest_is_refused(tiny_teacher, tmp_path):
    bad = copy_artifact(tiny_teacher, tmp_path / "bad")
    (bad / "manifest.json").write_bytes(b"{not json")
    assert "manifest.json: not valid JSON" in refused(bad)
    (bad / "manifest.json").unlink()
    assert "manifest.json: missing" in refused(bad)


def test_symlinked_file_out_of_the_artifact_is_refused(tiny_teacher, tmp_path):
    bad = copy_artifact(tiny_teacher, tmp_path / "bad")
    outside = tmp_path / "elsewhere.faiss"
    outside.write_bytes((bad / "items.faiss").read_bytes())  # even identical bytes
    (bad / "items.faiss").unlink()
    (bad / "items.faiss").symlink_to(outside)
    assert "items.faiss: resolves outside the artifact directory" in refused(bad)


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("renamed input", "user_tower.onnx: input(s) 'uid' are not ones serving provides"),
        (
            "output dim",
            "user_tower.onnx: output 'user_embedding' has shape ['batch', 8], its last dimension "
            "must be the index dimension (16, items.faiss)",
        ),
        (
            "float input",
            "user_tower.onnx: input 'user_features' is tensor(float), serving feeds tensor(int64)",
        ),
        ("ranker without candidates", "ranker.onnx: missing input(s) 'candidates'"),
    ],
)
def test_a_graph_whose_signature_does_not_fit_is_refused(tiny_teacher, tmp_path, shape, case, message):
    # Checksums are rewritten (amend_artifact): only the signature check can catch these.
    bad = copy_artifact(tiny_teacher, tmp_path / "bad")
    n, h, d = shape["n_users"], shape["history_len"], shape["dim"]
    files = {
        "renamed input": {"user_tower.onnx": fake_user_tower(n, h, d, user_input="uid")},
        "output dim": {"user_tower.onnx": fake_user_tower(n, h, 8)},
        "float input": {"user_tower.onnx": fake_user_tower(n, h, d, feature_type=TensorProto.FLOAT)},
        "ranker without candidates": {"ranker.onnx": fake_ranker_without_candidates(h)},
    }[case]
    amend_artifact(bad, files={name: (data, "served") for name, data in files.items()})
    load_artifact(bad)  # the checksums are fine
    assert message in refused(bad)


def test_a_matching_fake_tower_loads(tiny_teacher, tmp_path, shape):
    # The fake graphs above fail only where they are meant to: the right signature loads and serves.
    good = copy_artifact(tiny_teacher, tmp_path / "good")
    tower = fake_user_tower(shape["n_users"], shape["history_len"], shape["dim"])
    amend_artifact(good, files={"user_tower.onnx": (tower, "served")})
    assert load_variant("full", good).model.n_items > 0


@pytest.mark.parametrize(
    ("table", "change", "message"),
    [
        ("popular_items", lambda a: a + 10_000, "popular_items holds indices outside"),
        (
            "fitted_items",
            lambda a: np.concatenate([a[:-1], [10_000]]).astype(a.dtype),
            "fitted_items holds indices",
        ),
        ("fitted_indptr", lambda a: a[:-1], "fitted_indptr is not a CSR row pointer"),
        ("user_features", lambda a: a[:-1], "user_features has shape"),
    ],
)
def test_tables_that_do_not_fit_the_catalogue_are_refused(tiny_teacher, tmp_path, table, change, message):
    bad = copy_artifact(tiny_teacher, tmp_path / "bad")
    tables = safetensors.numpy.load_file(bad / "tables.safetensors")
    tables[table] = np.ascontiguousarray(change(tables[table]))
    amend_artifact(bad, files={"tables.safetensors": (safetensors.numpy.save(tables), "served")})
    error = refused(bad)
    assert "bad/tables.safetensors" in error and message in error


def test_nothing_on_the_serving_path_unpickles():
    # The load path: artifact (JSON + sha256), safetensors, FAISS read_index, ONNX Runtime. The
    # code (not docstrings) imports no pickle-capable loader and calls none with pickle allowed.
    repo = Path(__file__).resolve().parents[2]
    files = [
        *sorted((repo / "serving").glob("*.py")),
        *sorted((repo / "artifact").glob("*.py")),
        repo / "models/features.py",
    ]
    banned_modules = {
        "pickle",
        "_pickle",
        "cPickle",
        "dill",
        "cloudpickle",
        "joblib",
        "torch",
        "shelve",
        "marshal",
    }
    hits = []
    for path in files:
        for node in ast.walk(ast.parse(path.read_text())):
            where = f"{path.relative_to(repo)}:{getattr(node, 'lineno', '?')}"
            if isinstance(node, ast.Import | ast.ImportFrom):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                hits += [f"{where} imports {n}" for n in names if n.split(".")[0] in banned_modules]
            elif isinstance(node, ast.keyword) and node.arg == "allow_pickle":
                hits.append(f"{where} passes allow_pickle")
    assert not hits, f"pickle-capable loading on the serving path: {hits}"


# --- reload under a steady stream of requests ----------------------------------------------------


class Stream:
    """A bounded request stream in a thread: at most `max_requests`, at most `max_seconds`."""

    def __init__(self, url: str, max_requests: int = 4000, max_seconds: float = 30.0):
        import httpx

        self.client = httpx.Client(base_url=url, timeout=30)
        self.max_requests, self.max_seconds = max_requests, max_seconds
        self.results: list[tuple[float, int, str]] = []  # (time, status, full's model_version or error)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        started = time.monotonic()
        i = 0
        while (
            not self.stop.is_set() and i < self.max_requests and time.monotonic() - started < self.max_seconds
        ):
            variant = ("full", "full", "compressed")[i % 3]
            try:
                response = self.client.post(
                    "/v1/recommend",
                    json={"user_id": str(i % 900 + 1), "k": 10},
                    headers={"X-Slimrec-Variant": variant},
                )
                body = response.json()
                ok = response.status_code == 200 and len(body["items"]) == 10 and body["fallback"] is None
                self.results.append(
                    (
                        time.monotonic(),
                        response.status_code if ok else -response.status_code,
                        body.get("model_version", "") if variant == "full" else "",
                    )
                )
            except Exception as exc:  # recorded, never raised: the test asserts on the results
                self.results.append((time.monotonic(), 0, f"{type(exc).__name__}: {exc}"))
            i += 1

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join(60)
        self.client.close()


def test_reloads_under_load_swap_or_refuse_without_failing_a_request(tiny_teacher, tmp_path):
    root = tmp_path / "artifacts"
    v1 = copy_artifact(tiny_teacher, root / "v1")
    v2 = copy_artifact(tiny_teacher, root / "v2")
    amend_artifact(v2, files={"note.json": (b'{"note": "retrained"}', "served")})  # another served file
    corrupt = copy_artifact(tiny_teacher, root / "corrupt")
    data = bytearray((corrupt / "items.faiss").read_bytes())
    data[100] ^= 0xFF
    (corrupt / "items.faiss").write_bytes(bytes(data))
    unreadable = copy_artifact(tiny_teacher, root / "unreadable")  # checksums fine, FAISS cannot read it
    amend_artifact(unreadable, files={"items.faiss": (b"\x00not a faiss index" * 64, "served")})
    blocked = copy_artifact(tiny_teacher, root / "blocked")
    amend_artifact(blocked, fields={"promotable": False})

    with running_server(
        tmp_path,
        {"full": v1, "compressed": v1},
        "--batch-max-size",
        "8",
        env={"SLIMREC_ADMIN_TOKEN": ADMIN_TOKEN},
    ) as server:

        def reload(path: Path, expect: int) -> dict:
            response = server.client.post(
                "/admin/variants/full/reload", json={"path": path.name}, headers=AUTH
            )
            assert response.status_code == expect, response.text
            return response.json()

        old = server.client.post(
            "/v1/recommend", json={"user_id": "1"}, headers={"X-Slimrec-Variant": "full"}
        ).json()["model_version"]
        with Stream(server.url) as stream:
            time.sleep(1.0)
            swapped = reload(v2, 200)  # (a)
            time.sleep(0.8)
            assert "corrupt/items.faiss: checksum mismatch" in reload(corrupt, 422)["detail"]  # (b)
            assert "still serving the previous one" in reload(unreadable, 422)["detail"]
            time.sleep(0.8)
            assert "promotable: false" in reload(blocked, 409)["detail"]  # (c)
            time.sleep(1.5)
        text = server.client.get("/metrics").text
        assert "Traceback" not in server.log()

    results = stream.results
    failures = [r for r in results if r[1] != 200]
    assert len(results) > 50 and not failures, f"{len(failures)} of {len(results)} failed: {failures[:3]}"
    versions = [version for _, _, version in results if version]
    assert swapped["previous_version"] == old and swapped["model_version"] != old
    assert versions[0] == old and versions[-1] == swapped["model_version"]
    first_new = versions.index(swapped["model_version"])
    assert all(v == swapped["model_version"] for v in versions[first_new:]), (
        "a refused reload changed the model"
    )
    for outcome, count in (("swapped", 1), ("invalid_artifact", 2), ("not_promotable", 1)):
        assert metric_value(text, "slimrec_reloads_total", variant="full", outcome=outcome) == count, outcome
    print(
        f"{len(results)} requests during 4 reloads, 0 failed; "
        f"full served {old} then {swapped['model_version']}"
    )
