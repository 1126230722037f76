"""`slimrec` command line: user errors exit 2 with one line naming the bad value; evaluate is repeatable."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from slimrec.artifact import load_artifact

from slimrec.cli import main


def run(argv: list[str], capsys) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `slimrec argv`; argparse's own errors exit through SystemExit."""
    try:
        code = main(argv)
    except SystemExit as exc:
        code = exc.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def one_line_error(err: str, command: str) -> str:
    """The error line of a handled error: exactly one line, prefixed with the command."""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"slimrec {command}: error: "), err
    return lines[0]


@pytest.fixture(autouse=True)
def keep_torch_threads():
    """`slimrec train` sets torch's thread count for the process; give the other tests theirs back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def train(tmp_path, *extra: str) -> list[str]:
    return ["train", "--preset", "tiny", "--out", str(tmp_path / "out"), "--threads", "1", *extra]


# --- the parser ------------------------------------------------------------------------------------


def test_version_prints_the_package_version(capsys):
    from importlib.metadata import version

    import slimrec

    code, out, _ = run(["--version"], capsys)
    assert code == 0
    assert out.strip() == f"slimrec {slimrec.__version__}" == f"slimrec {version('slimrec')}"


def test_parser_imports_no_torch():
    """`slimrec serve` builds this parser (preset names included) in processes that never load torch."""
    import subprocess
    import sys

    code = "import sys; from slimrec.cli import build_parser; build_parser(); print('torch' in sys.modules)"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd="/"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"


@pytest.mark.parametrize(("text", "value"), [("1", 1), ("32", 32)])
def test_positive_int_accepts(text, value):
    from slimrec.bench.argtypes import positive_int

    assert positive_int(text) == value


@pytest.mark.parametrize("text", ["0", "-3", "1.5", "ten", ""])
def test_positive_int_rejects(text):
    import argparse

    from slimrec.bench.argtypes import positive_int

    with pytest.raises(argparse.ArgumentTypeError, match="expected a positive integer"):
        positive_int(text)


def test_demo_rejects_a_bad_load_duration_before_any_work(tmp_path, capsys):
    code, _, err = run(["demo", "--out", str(tmp_path / "demo"), "--load-duration", "20 parsecs"], capsys)
    assert code == 2
    assert "20 parsecs" in one_line_error(err, "demo")
    assert not (tmp_path / "demo").exists()


# --- train: bad data, preset or config --------------------------------------------------------------


def test_train_unknown_dataset(tmp_path, capsys):
    code, _, err = run(train(tmp_path, "--data", "no-such-dataset"), capsys)
    assert code == 2
    assert "no dataset 'no-such-dataset'" in one_line_error(err, "train")
    assert not (tmp_path / "out").exists()


def test_train_unknown_preset(tmp_path, capsys):
    code, _, err = run(["train", "--preset", "nope", "--out", str(tmp_path / "out")], capsys)
    assert code == 2
    assert "invalid choice: 'nope'" in err.strip().splitlines()[-1]


@pytest.mark.parametrize(
    ("toml", "named"),
    [
        ("[two_tower]\nbogus_width = 3\n", "bogus_width"),  # unknown key in a table
        ("epochs = 3\n", "epochs"),  # unknown top-level key
        ("[ranker]\ncross_rank = 0\n", "cross_rank must be >= 1 or None, got 0"),  # a known key, bad value
        ("[two_tower]\ntemperature = 5.0\n", "temperature must be in (0, 1], got 5.0"),
        ("[retrieval_schedule]\nlr = -1.0\n", "lr=-1.0"),
    ],
)
def test_train_bad_config_values(tmp_path, capsys, toml, named):
    config = tmp_path / "train.toml"
    config.write_text(toml)
    code, _, err = run(train(tmp_path, "--config", str(config)), capsys)
    assert code == 2
    line = one_line_error(err, "train")
    assert named in line


def test_train_config_names_the_file_for_an_unknown_key(tmp_path, capsys):
    config = tmp_path / "train.toml"
    config.write_text("[two_tower]\nbogus_width = 3\n")
    code, _, err = run(train(tmp_path, "--config", str(config)), capsys)
    assert code == 2
    assert str(config) in one_line_error(err, "train")


def test_train_config_not_toml(tmp_path, capsys):
    config = tmp_path / "broken.toml"
    config.write_text("[two_tower\nid_dim = 8\n")
    code, _, err = run(train(tmp_path, "--config", str(config)), capsys)
    assert code == 2
    line = one_line_error(err, "train")
    assert str(config) in line and "not valid TOML" in line


def test_train_config_missing_file(tmp_path, capsys):
    missing = tmp_path / "nowhere.toml"
    code, _, err = run(train(tmp_path, "--config", str(missing)), capsys)
    assert code == 2
    assert "nowhere.toml" in one_line_error(err, "train")


# --- data synth ------------------------------------------------------------------------------------


@pytest.mark.parametrize("flag", ["--items", "--users", "--interactions"])
def test_data_synth_rejects_zero(tmp_path, capsys, flag):
    sizes = {"--items": "10", "--users": "10", "--interactions": "50", flag: "0"}
    argv = ["data", "synth", *[x for pair in sizes.items() for x in pair], "--out", str(tmp_path)]
    code, _, err = run(argv, capsys)
    assert code == 2
    last = err.strip().splitlines()[-1]
    assert flag in last and "expected a positive integer, got '0'" in last


def test_data_synth_rejects_an_impossible_shape(tmp_path, capsys):
    # 10 users need at least 5 interactions each: 1 cannot be drawn.
    code, _, err = run(
        [
            "data",
            "synth",
            "--items",
            "10",
            "--users",
            "10",
            "--interactions",
            "1",
            "--out",
            str(tmp_path / "synth"),
        ],
        capsys,
    )
    assert code == 2
    assert "n_interactions must lie in [50, 50]" in one_line_error(err, "data synth")


# --- evaluate ---------------------------------------------------------------------------------------


def test_evaluate_missing_directory(tmp_path, capsys):
    missing = tmp_path / "no-artifact"
    code, _, err = run(["evaluate", str(missing)], capsys)
    assert code == 2
    line = one_line_error(err, "evaluate")
    assert str(missing) in line and "not an artifact directory" in line


@pytest.fixture
def teacher_copy(tiny_teacher, tmp_path):
    """A private copy: evaluate rewrites metrics.json, and some tests tamper with files."""
    return shutil.copytree(tiny_teacher, tmp_path / "teacher")


@pytest.mark.slow
def test_evaluate_tampered_artifact_names_the_file(teacher_copy, capsys):
    path = teacher_copy / "ranker.onnx"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, different bytes: only the checksum can tell
    path.write_bytes(bytes(data))
    code, _, err = run(["evaluate", str(teacher_copy)], capsys)
    assert code == 2
    assert "ranker.onnx" in one_line_error(err, "evaluate")


@pytest.mark.slow
def test_evaluate_unknown_dataset(teacher_copy, capsys):
    code, _, err = run(["evaluate", str(teacher_copy), "--data", "no-such-dataset"], capsys)
    assert code == 2
    assert "no dataset 'no-such-dataset'" in one_line_error(err, "evaluate")


def assert_same_numbers(a, b, where: str = "") -> None:
    """Same structure; numbers equal to 1e-9, everything else equal."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), where
        for key in a:
            assert_same_numbers(a[key], b[key], f"{where}/{key}")
    elif isinstance(a, float) or isinstance(b, float):
        assert a == pytest.approx(b, abs=1e-9), where
    else:
        assert a == b, where


@pytest.mark.slow
def test_evaluate_reproduces_metrics_json(teacher_copy, capsys):
    before = json.loads((teacher_copy / "metrics.json").read_text())
    code, out, _ = run(["evaluate", str(teacher_copy)], capsys)
    assert code == 0
    after = json.loads((teacher_copy / "metrics.json").read_text())
    assert_same_numbers(before, after)
    load_artifact(teacher_copy)  # the rewritten metrics.json is checksummed in the manifest again
    # The printed table: one row per stage and fold, ndcg@10 as in metrics.json.
    row = next(line for line in out.splitlines() if line.split()[:2] == ["two_stage", "test"])
    assert f"{after['two_stage']['test']['ndcg@10']:.4f}" in row
