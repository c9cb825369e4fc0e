"""House rules that a test can check: algorithm files never import each other."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BUILDING_BLOCKS = {"common", "lora", "rewards", "kernels", "toy"}
ALGORITHMS = ["sft_think", "grpo", "dpo_online", "rlmt", "gkd", "karcher_merge", "eval_reasoning"]


def _imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_algorithm_files_never_import_each_other():
    present = [a for a in ALGORITHMS if (ROOT / f"{a}.py").exists()]
    for algo in present:
        bad = _imported_modules(ROOT / f"{algo}.py") & (set(ALGORITHMS) - {algo})
        assert not bad, f"{algo}.py imports algorithm file(s) {sorted(bad)}; import building blocks only"


def test_checker_sees_imports(tmp_path):
    # the checker itself must catch both import forms, or the test above proves nothing
    f = tmp_path / "x.py"
    f.write_text("import grpo\nfrom sft_think import main\nimport common\n")
    assert _imported_modules(f) >= {"grpo", "sft_think", "common"}


def test_building_blocks_never_import_algorithms():
    for block in ["common", "lora", "rewards", "toy"]:
        path = ROOT / f"{block}.py"
        if path.exists():
            bad = _imported_modules(path) & set(ALGORITHMS)
            assert not bad, f"{block}.py imports algorithm file(s) {sorted(bad)}"
