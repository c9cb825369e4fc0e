"""House rules that a test can check: algorithms on top, building blocks below, no circles, files of
a readable size."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BUILDING_BLOCKS = {
    "chat",
    "common",
    "sampling",
    "lora",
    "rewards",
    "answers",
    "judges",
    "serving",
    "likelihood",
    "vocab_kernels",
    "toy",
}
ALGORITHMS = ["sft_think", "grpo", "dpo_online", "rlmt", "gkd", "karcher_merge", "eval_reasoning"]
ALGORITHM_MAX_LINES = 600
BLOCK_MAX_LINES = 800


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
        "import grpo\nfrom sft_think import main\nimport common\nfrom toy.tasks import arithmetic\n"
    )
    assert _imported_modules(f) >= {"grpo", "sft_think", "common", "toy"}


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
