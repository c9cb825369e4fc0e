"""Print a markdown table of the held-out metric before and after each run: results_table.py
RUN_DIR...

Runs with a teacher (gkd.py) add the teacher's score and the share of the student-teacher gap
closed."""

import json
import sys
from pathlib import Path


def main(dirs: list[str]) -> None:
    runs = [(d, json.loads((Path(d) / "summary.json").read_text())) for d in dirs]
    teacher = any("teacher" in s["heldout"] for _, s in runs)

    def fmt(v):
        return "-" if v is None else f"{v:.3f}"

    extra = " teacher | gap closed |" if teacher else ""
    print("| stage | run | held-out metric | before | after |" + extra)
    print("|---|---|---|---|---|" + ("---|---|" if teacher else ""))
    for d, s in runs:
        h = s["heldout"]
        name = s.get("method", "?") + (f" ({s['variant']})" if s.get("variant") else "")
        row = (
            f"| {name} | {d} | {h['metric']}{' ' + h['note'] if h.get('note') else ''} | "
            f"{fmt(h['before'])} | {fmt(h['after'])} |"
        )
        if teacher:
            row += f" {fmt(h.get('teacher'))} | {fmt(h.get('gap_closed'))} |"
        print(row)


if __name__ == "__main__":
    main(sys.argv[1:])
