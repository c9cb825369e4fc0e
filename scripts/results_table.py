"""Print a markdown table of the held-out metric before and after each run: results_table.py RUN_DIR..."""
import json
import sys
from pathlib import Path


def main(dirs: list[str]) -> None:
    print("| stage | run | held-out metric | before | after |\n|---|---|---|---|---|")
    for d in dirs:
        s = json.loads((Path(d) / "summary.json").read_text())
        h = s["heldout"]
        fmt = (lambda v: "-" if v is None else f"{v:.3f}")
        print(f"| {s.get('method', '?')} | {d} | {h['metric']}{' ' + h['note'] if h.get('note') else ''} | "
              f"{fmt(h['before'])} | {fmt(h['after'])} |")


if __name__ == "__main__":
    main(sys.argv[1:])
