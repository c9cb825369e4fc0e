"""House rules that a test can check: algorithms on top, building blocks below, no circles, files of
a readable size."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BUILDING_BLOCKS = {
    "errors",
    "cli",
    "dataio",
    "loading",
    "distributed",
    "lifecycle",
    "stats",
    "tasks",
    "chat",
    "sampling",
    "lora",
    "rewards",
    "answers",
    "judges",
    "serving",
    "likelihood",
    "offline",
    "benchmarks",
    "samplecache",
    "gate",
    "plots",
    "vocab_kernels",
    "toy",
}
ALGORITHMS = ["sft_think", "grpo", "dpo_online", "rlmt", "gkd", "karcher_merge", "eval_reasoning"]
# A guard against growth, not a target: an algorithm file reads as its method in one sitting (at
# 100 columns, formatted), and plumbing moves into a building block instead of compressing.
ALGORITHM_MAX_LINES = 750
BLOCK_MAX_LINES = 900


def _imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def _block_files() -> list[Path]:
    files = [ROOT / f"{b}.py" for b in sorted(BUILDING_BLOCKS) if (ROOT / f"{b}.py").exists()]
    return (
        files + sorted((ROOT / "vocab_kernels").glob("*.py")) + sorted((ROOT / "toy").glob("*.py"))
    )


def test_algorithm_files_never_import_each_other():
    present = [a for a in ALGORITHMS if (ROOT / f"{a}.py").exists()]
    assert present, "no algorithm file found"
    for algo in present:
        bad = _imported_modules(ROOT / f"{algo}.py") & (set(ALGORITHMS) - {algo})
        assert not bad, (
            f"{algo}.py imports algorithm file(s) {sorted(bad)}; import building blocks only"
        )


def test_checker_sees_imports(tmp_path):
    # the checker itself must catch both import forms, or the tests here prove nothing
    f = tmp_path / "x.py"
    f.write_text(
        "import grpo\nfrom sft_think import main\nimport lora\nfrom toy.tasks import arithmetic\n"
    )
    assert _imported_modules(f) >= {"grpo", "sft_think", "lora", "toy"}


def test_building_blocks_never_import_algorithms():
    files = _block_files()
    assert len(files) >= len(BUILDING_BLOCKS), [f.name for f in files]
    for path in files:
        bad = _imported_modules(path) & set(ALGORITHMS)
        assert not bad, f"{path.relative_to(ROOT)} imports algorithm file(s) {sorted(bad)}"


def test_files_stay_readable():
    long = [
        (a, n)
        for a in ALGORITHMS
        if (ROOT / f"{a}.py").exists()
        and (n := len((ROOT / f"{a}.py").read_text().splitlines())) > ALGORITHM_MAX_LINES
    ]
    long += [
        (str(p.relative_to(ROOT)), n)
        for p in _block_files()
        if (n := len(p.read_text().splitlines())) > BLOCK_MAX_LINES
    ]
    assert not long, (
        f"over {ALGORITHM_MAX_LINES} lines (algorithms) or {BLOCK_MAX_LINES} (building blocks): "
        f"{long}"
    )


def test_repo_cites_public_sources_only():
    # A reader of the repo cannot open the project's private notes: cite model cards and papers
    # instead.
    bad = []
    for path in ROOT.rglob("*"):
        if (
            path.suffix not in {".py", ".md", ".sh", ".txt", ".jinja", ".json"}
            or ".venv" in path.parts
            or "runs" in path.parts
            or path.name == "test_layout.py"
        ):
            continue
        text = path.read_text(errors="ignore").lower()
        for phrase in ("seed 00", "seeds 00", "reference.md"):
            if phrase in text:
                bad.append((str(path.relative_to(ROOT)), phrase))
    assert not bad, bad


def _module_name(path: Path, root: Path) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _repo_module(name: str, root: Path) -> str | None:
    """The longest prefix of dotted `name` that is a repo module or package; None otherwise."""
    parts = name.split(".")
    for k in range(len(parts), 0, -1):
        path = root.joinpath(*parts[:k])
        if path.with_suffix(".py").is_file() or (path / "__init__.py").is_file():
            return ".".join(parts[:k])
    return None


def import_graph(root: Path, packages=("toy", "vocab_kernels")) -> dict[str, set[str]]:
    """Module -> the repo modules it imports, at any depth (an import inside a function counts: it
    runs the first time the function does). `from pkg import sub` is an edge to pkg.sub, the module
    it loads, not to pkg."""
    files = sorted(root.glob("*.py"))
    for package in packages:
        files += sorted(root.glob(f"{package}/*.py"))
    graph = {}
    for path in files:
        module = _module_name(path, root)
        package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
        deps = set()
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                deps.update(_repo_module(alias.name, root) for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package[: len(package) - (node.level - 1)]
                    source = ".".join(base + ([node.module] if node.module else []))
                else:
                    source = node.module
                for alias in node.names:
                    deps.add(_repo_module(f"{source}.{alias.name}", root))
        graph[module] = deps - {None, module}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle as [a, b, ..., a] (depth-first search), or None when there is none."""
    done, path = set(), []

    def visit(node):
        path.append(node)
        for dep in sorted(graph.get(node, ())):
            if dep in path:
                return path[path.index(dep) :] + [dep]
            if dep not in done:
                cycle = visit(dep)
                if cycle:
                    return cycle
        path.pop()
        done.add(node)
        return None

    for node in sorted(graph):
        if node not in done:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def test_no_import_circles():
    graph = import_graph(ROOT)
    assert {"cli", "lifecycle", "toy", "toy.model", "vocab_kernels.chunked"} <= set(graph)
    cycle = find_cycle(graph)
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_cycle_checker_sees_imports_inside_functions(tmp_path):
    (tmp_path / "a.py").write_text("def f():\n    import b\n")
    (tmp_path / "b.py").write_text("def g():\n    from a import f\n")
    (tmp_path / "c.py").write_text("import a\n")
    graph = import_graph(tmp_path)
    assert graph == {"a": {"b"}, "b": {"a"}, "c": {"a"}}
    assert find_cycle(graph) == ["a", "b", "a"]
    (tmp_path / "b.py").write_text("def g():\n    pass\n")
    assert find_cycle(import_graph(tmp_path)) is None


def test_cycle_checker_follows_submodule_imports(tmp_path):
    # `from pkg import sub` loads pkg.sub: an edge to it, so pkg/__init__ importing a module that
    # imports pkg.sub is no circle, but pkg.sub importing that module back is one
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "__init__.py").write_text("import user\n")
    (tmp_path / "pkg" / "sub.py").write_text("x = 1\n")
    (tmp_path / "user.py").write_text("from pkg import sub\n")
    graph = import_graph(tmp_path, packages=["pkg"])
    assert graph == {"pkg": {"user"}, "pkg.sub": set(), "user": {"pkg.sub"}}
    assert find_cycle(graph) is None
    (tmp_path / "pkg" / "sub.py").write_text("import user\n")
    assert find_cycle(import_graph(tmp_path, ["pkg"])) == ["user", "pkg.sub", "user"]


def _ruff() -> Path:
    ruff = Path(sys.executable).parent / "ruff"
    if not ruff.exists():
        pytest.skip(f"ruff is not installed next to {sys.executable} (pip install ruff)")
    return ruff


@pytest.mark.parametrize("command", [["format", "--check", "."], ["check", "."]])
def test_ruff_is_clean(command):
    result = subprocess.run(
        [str(_ruff()), *command], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, f"ruff {' '.join(command)}:\n{result.stdout}{result.stderr}"
