"""The wheel installs one namespace, `slimrec`, and its bare install serves without torch.

A wheel is built from the checkout and installed as `slimrec[serve]` (the serving extra, which is
the base dependencies; pinned by constraints.txt) into a fresh venv; everything that venv runs
starts in a temporary directory, outside the checkout. Its `slimrec serve` must answer from the
golden artifact with torch not even installed. The dev venv has torch installed, so serving from
it is the stronger check: neither the server nor its model processes (--model-process) may import
torch, pandas, onnx, locust or matplotlib.

Two independent records of what each served process imports (spawned children inherit both):
  - a sitecustomize.py on PYTHONPATH puts a finder in front of sys.meta_path that writes, per pid,
    the process's command line and every attempt to import a training/load-test/plot module;
  - PYTHONPROFILEIMPORTTIME=1 makes each process log every import it executes to stderr.

Cost: the module builds the wheel and the venv once (about 15 s from pip's cache, longer on a
cold cache: pip downloads numpy, faiss-cpu, onnxruntime and the server's dependencies), then
starts four servers of a few seconds each.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import httpx
import pytest
from serving_fixtures import running_server
from slimrec.loadtest.launch import free_port, is_ready, serve_command, stop

REPO = Path(__file__).resolve().parents[1]
GOLDEN = REPO / "tests" / "golden" / "ml100k-tiny-compressed"
# The training, load-test and plot extras; none of them may be imported by a served process.
FORBIDDEN = ("torch", "pandas", "onnx", "onnxscript", "tqdm", "locust", "matplotlib")
# The checkout's folders, which install only as slimrec.<name>.
OLD_TOP_LEVEL = ("models", "compression", "artifact", "serving", "loadtest", "bench")
BUILD_TIMEOUT_S = 300
PIP_TIMEOUT_S = 900
READY_TIMEOUT_S = 90.0
REQUEST = {"user_id": "1", "k": 5}

GUARD = """\
# Written by tests/test_packaging.py: records, per process, attempts to import forbidden modules.
import os
import sys

_FORBIDDEN = frozenset({forbidden!r})
_LOG = os.path.join({log_dir!r}, f"{{os.getpid()}}.log")
with open(_LOG, "a") as _f:
    _f.write("argv " + " ".join(sys.orig_argv) + "\\n")


class _ImportGuard:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in _FORBIDDEN:
            with open(_LOG, "a") as f:
                f.write("import " + name + "\\n")
        return None  # only records; the import goes on as it would have


sys.meta_path.insert(0, _ImportGuard())
"""


def clean_env(**extra: str) -> dict[str, str]:
    """Our environment without settings that would point a child at the checkout or its venv."""
    drop = ("SLIMREC_", "PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONPROFILEIMPORTTIME")
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    env.update(extra)
    return env


def run(command: list[str], cwd: Path, timeout: float, env: dict[str, str] | None = None):
    result = subprocess.run(
        command, cwd=cwd, env=env or clean_env(), capture_output=True, text=True, timeout=timeout
    )
    assert result.returncode == 0, f"{command} exited with {result.returncode}:\n{result.stderr[-4000:]}"
    return result


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel of the checkout, built from a copy of it (the build writes build/ and *.egg-info)."""
    work = tmp_path_factory.mktemp("wheel")
    source = work / "src"
    shutil.copytree(
        REPO,
        source,
        ignore=shutil.ignore_patterns(
            ".git",
            ".venv",
            "build",
            "dist",
            "*.egg-info",
            "__pycache__",
            ".*_cache",
            ".hypothesis",
            ".typecheck",
            "artifacts",
            "data",
            "runs",
            "tests",
        ),
    )
    run(
        [
            sys.executable,
            "-m",
            "build",
            "--wheel",
            "--no-isolation",
            "--outdir",
            str(work / "dist"),
            str(source),
        ],
        cwd=work,
        timeout=BUILD_TIMEOUT_S,
    )
    (built,) = (work / "dist").glob("slimrec-*.whl")
    return built


@pytest.fixture(scope="module")
def serve_venv(wheel, tmp_path_factory) -> Path:
    """A fresh venv with the wheel and its serving extra only; returns its bin/ directory."""
    work = tmp_path_factory.mktemp("serve-venv")
    venv = work / "venv"
    run([sys.executable, "-m", "venv", str(venv)], cwd=work, timeout=120)
    run(
        [
            str(venv / "bin" / "python"),
            "-m",
            "pip",
            "install",
            "--quiet",
            "-c",
            str(REPO / "constraints.txt"),
            f"{wheel}[serve]",
        ],
        cwd=work,
        timeout=PIP_TIMEOUT_S,
    )
    return venv / "bin"


@pytest.fixture
def outside(tmp_path) -> Path:
    """A working directory outside the checkout, so nothing resolves against the source folders."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    return cwd


def import_guard(tmp_path: Path) -> tuple[Path, Path]:
    """(PYTHONPATH directory holding the guard's sitecustomize.py, the directory of its logs)."""
    site, logs = tmp_path / "guard-site", tmp_path / "guard-logs"
    site.mkdir()
    logs.mkdir()
    (site / "sitecustomize.py").write_text(GUARD.format(forbidden=FORBIDDEN, log_dir=str(logs)))
    return site, logs


def guard_env(tmp_path: Path) -> tuple[dict[str, str], Path]:
    site, logs = import_guard(tmp_path)
    return {"PYTHONPATH": str(site), "PYTHONPROFILEIMPORTTIME": "1"}, logs


def assert_imports_nothing_forbidden(logs: Path, server_log: str, model_process: bool) -> None:
    """Neither record shows a forbidden import; with model processes, a child was recorded too."""
    records = {p.stem: p.read_text().splitlines() for p in logs.glob("*.log")}
    assert records, "the import guard recorded no process: was sitecustomize.py not loaded?"
    attempts = {pid: [line for line in lines if line.startswith("import ")] for pid, lines in records.items()}
    assert not any(attempts.values()), f"forbidden imports by pid: {attempts}\n{records}"
    if model_process:
        children = [pid for pid, lines in records.items() if "spawn_main" in lines[0]]
        assert children, f"no spawned model process was recorded: {records}"
    timed = [
        line.rpartition("|")[2].strip() for line in server_log.splitlines() if line.startswith("import time:")
    ]
    assert "slimrec.serving.app" in timed and "onnxruntime" in timed, "PYTHONPROFILEIMPORTTIME logged nothing"
    executed = sorted({name for name in timed if name.partition(".")[0] in FORBIDDEN})
    assert not executed, f"imported by a served process: {executed}"


def assert_recommends(client: httpx.Client) -> None:
    response = client.post("/v1/recommend", json=REQUEST)
    assert response.status_code == 200, response.text
    items = response.json()["items"]
    assert len(items) == REQUEST["k"] and all(item["item_id"] for item in items)


@contextlib.contextmanager
def venv_server(bin_dir: Path, cwd: Path, artifact: Path, *args: str, env: dict[str, str]):
    """The venv's `slimrec serve` console script on a free loopback port, started in cwd."""
    port = free_port()
    command = [str(bin_dir / "slimrec"), *serve_command({"compressed": str(artifact)}, port, *args)[3:]]
    log_path = cwd / f"server-{port}.log"
    url = f"http://127.0.0.1:{port}"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            command, cwd=cwd, env=clean_env(**env), stdout=log, stderr=subprocess.STDOUT
        )
    try:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not is_ready(url):
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(
                    f"server not ready (exit code {process.poll()}):\n"
                    f"{log_path.read_text(errors='replace')[-4000:]}"
                )
            time.sleep(0.2)
        with httpx.Client(base_url=url, timeout=30.0) as client:
            yield client, log_path
    finally:
        stop(process)


def test_the_wheel_installs_only_the_slimrec_namespace(wheel):
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        dist_info = next(n.split("/")[0] for n in names if n.split("/")[0].endswith(".dist-info"))
        top_level = archive.read(f"{dist_info}/top_level.txt").decode().split()
        metadata = archive.read(f"{dist_info}/METADATA").decode()
    assert {n.split("/")[0] for n in names} == {"slimrec", dist_info}
    assert top_level == ["slimrec"]
    for module in (
        "cli",
        "models/train",
        "compression/pipeline",
        "artifact/load",
        "serving/app",
        "loadtest/locustfile",
        "bench/stages",
    ):
        assert f"slimrec/{module}.py" in names
    base = [
        re.match(r"Requires-Dist: *([A-Za-z0-9_.-]+)", line).group(1).lower()
        for line in metadata.splitlines()
        if line.startswith("Requires-Dist:") and "extra ==" not in line
    ]
    assert "onnxruntime" in base and not set(base) & set(FORBIDDEN), base


def test_the_serve_install_has_no_training_packages_nor_the_old_top_level_names(serve_venv, outside):
    probe = (
        "import importlib, json, sys\n"
        "found = {}\n"
        "for name in sys.argv[1:]:\n"
        "    try:\n"
        "        importlib.import_module(name)\n"
        "        found[name] = True\n"
        "    except ImportError:\n"
        "        found[name] = False\n"
        "print(json.dumps(found))\n"
    )
    names = [*FORBIDDEN, *OLD_TOP_LEVEL, "slimrec.serving.app", "slimrec.artifact.runtime"]
    found = json.loads(
        run([str(serve_venv / "python"), "-c", probe, *names], cwd=outside, timeout=120).stdout
    )
    assert found == {name: name.startswith("slimrec.") for name in names}


def test_the_console_script_runs_outside_the_checkout(wheel, serve_venv, outside):
    help_text = run([str(serve_venv / "slimrec"), "--help"], cwd=outside, timeout=60).stdout
    assert "serve" in help_text and "train" in help_text
    assert (
        "usage: slimrec serve"
        in run([str(serve_venv / "slimrec"), "serve", "--help"], cwd=outside, timeout=60).stdout
    )
    if "--version" not in help_text:
        pytest.skip("slimrec has no --version yet")
    version = run([str(serve_venv / "slimrec"), "--version"], cwd=outside, timeout=60).stdout
    assert wheel.name.split("-")[1] in version, version


@pytest.mark.parametrize("model_process", [False, True], ids=["in-process", "model-process"])
def test_the_serve_install_serves_the_golden_artifact_without_torch(serve_venv, outside, model_process):
    artifact = shutil.copytree(GOLDEN, outside / "compressed")
    env, logs = guard_env(outside.parent)
    args = ("--model-process",) if model_process else ()
    with venv_server(serve_venv, outside, artifact, *args, env=env) as (client, log_path):
        assert_recommends(client)
        for _ in range(5):
            assert_recommends(client)
    assert_imports_nothing_forbidden(logs, log_path.read_text(errors="replace"), model_process)


@pytest.mark.parametrize("model_process", [False, True], ids=["in-process", "model-process"])
def test_serving_from_the_dev_venv_never_imports_torch(tmp_path, model_process):
    """The dev venv has torch installed: a stray `import torch` on the serve path would succeed here."""
    assert importlib.util.find_spec("torch") is not None, "the dev venv should have the train extra"
    artifact = shutil.copytree(GOLDEN, tmp_path / "compressed")
    env, logs = guard_env(tmp_path)
    args = ("--model-process",) if model_process else ()
    with running_server(tmp_path, {"compressed": artifact}, *args, env=env) as server:
        for _ in range(6):
            assert_recommends(server.client)
    assert_imports_nothing_forbidden(logs, server.log_path.read_text(errors="replace"), model_process)


def test_the_import_records_would_catch_a_forbidden_import(tmp_path):
    """The guard and the import-time log both see a training module imported (tqdm: the cheapest)."""
    env, logs = guard_env(tmp_path)
    result = run([sys.executable, "-c", "import tqdm"], cwd=tmp_path, timeout=60, env=clean_env(**env))
    assert "import tqdm" in (next(logs.glob("*.log"))).read_text()
    assert any(line.endswith("| tqdm") for line in result.stderr.splitlines())
