"""The house's arrows, checked on the source: which package may import which, no circles, no private names.

    serving -> artifact            compression -> models, artifact      models -> artifact
    bench -> compression, models, artifact, loadtest's parsers only    loadtest -> HTTP only
    experiment -> models, serving's log reader, loadtest's server launcher, bench's argtypes
    artifact -> numpy, onnxruntime, faiss, safetensors (never torch)   slimrec (the CLI) -> any

Every import counts, at module level or inside a function (a lazy import is still an arrow).
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = {
    "models": "models",
    "compression": "compression",
    "artifact": "artifact",
    "serving": "serving",
    "loadtest": "loadtest",
    "bench": "bench",
    "experiment": "experiment",
    "slimrec": "slimrec",
}
ALLOWED = {
    "artifact": {"artifact"},
    "models": {"models", "artifact"},
    "compression": {"compression", "models", "artifact"},
    "serving": {"serving", "artifact"},
    "loadtest": {"loadtest"},
    "bench": {"bench", "compression", "models", "artifact"},
    # replay reads the split fold (models), starts servers (loadtest) and reads their logs (serving);
    # the command line's argument types are bench's (standard library only)
    "experiment": {"experiment", "models", "serving", "loadtest", "artifact", "bench"},
}
TRAINING_STACK = {"torch", "pandas", "onnx", "onnxscript", "matplotlib", "locust", "tqdm"}


def module_name(path: Path) -> str:
    folder = path.parent.name
    stem = path.stem
    base = "slimrec" if folder == "slimrec" else f"slimrec.{folder}"
    return base if stem == "__init__" else f"{base}.{stem}"


def source_modules() -> dict[str, Path]:
    return {module_name(p): p for folder in PACKAGES for p in sorted((REPO / folder).glob("*.py"))}


def imports_of(path: Path) -> list[tuple[str, list[str]]]:
    """(module, imported names) for every import statement in the file, absolute names."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.module, [alias.name for alias in node.names]))
    return found


def package_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in ALLOWED else "slimrec"


MODULES = source_modules()


def test_every_package_is_found():
    assert {package_of(m) for m in MODULES} == set(ALLOWED) | {"slimrec"}
    assert len(MODULES) > 60


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_packages_import_only_along_the_arrows(package):
    wrong = []
    for module, path in MODULES.items():
        if package_of(module) != package:
            continue
        for target, _ in imports_of(path):
            if target.split(".")[0] in PACKAGES and target.split(".")[0] != "slimrec":
                wrong.append(f"{module} imports {target} (outside the slimrec namespace)")
            elif target.startswith("slimrec") and package_of(target) not in ALLOWED[package]:
                wrong.append(f"{module} imports {target}")
    assert not wrong, "\n".join(wrong)


# The load tester drives locust and draws its latency plot (the loadtest and plots extras).
STACK_ALLOWED = {"artifact": set(), "serving": set(), "loadtest": {"locust", "matplotlib"}}


@pytest.mark.parametrize("package", sorted(STACK_ALLOWED))
def test_the_serving_side_never_imports_the_training_stack(package):
    banned = TRAINING_STACK - STACK_ALLOWED[package]
    found = [
        f"{m} imports {t}"
        for m, p in MODULES.items()
        if package_of(m) == package
        for t, _ in imports_of(p)
        if t.split(".")[0] in banned
    ]
    assert not found, "\n".join(found)


def test_no_module_imports_another_modules_private_names():
    private = [
        f"{m} imports {name} from {t}"
        for m, p in MODULES.items()
        for t, names in imports_of(p)
        if t.startswith("slimrec")
        for name in names
        if name.startswith("_") and name != "__version__"
    ]
    assert not private, "\n".join(private)


def test_there_are_no_import_circles():
    graph = defaultdict(set)
    for module, path in MODULES.items():
        for target, names in imports_of(path):
            if not target.startswith("slimrec"):
                continue
            # `from slimrec.serving import admin` imports the module slimrec.serving.admin
            submodules = [f"{target}.{n}" for n in names if f"{target}.{n}" in MODULES]
            for dep in submodules or [target]:
                if dep in MODULES and dep != module and not module.startswith(dep + "."):
                    graph[module].add(dep)
    cycles = []
    state: dict[str, int] = {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                cycles.append(" -> ".join(stack[stack.index(dep) :] + [dep]))
            elif dep not in state:
                visit(dep, [*stack, dep])
        state[node] = 2

    for module in sorted(MODULES):
        if module not in state:
            visit(module, [module])
    assert not cycles, "\n".join(cycles)


def test_the_checks_see_a_planted_violation(tmp_path):
    # The walker must see lazy imports and private names, or the tests above prove nothing.
    planted = tmp_path / "planted.py"
    planted.write_text("def f():\n    from slimrec.models.train import _secret\n    import torch\n")
    assert imports_of(planted) == [("slimrec.models.train", ["_secret"]), ("torch", [])]
