"""Run a training script and die like a SIGKILLed process right after its checkpoint at step N (no
cleanup, no final outputs), so that "killed, then resumed == uninterrupted" is tested
deterministically:

    python tests/_kill_after_checkpoint.py N script.py [flags...]
"""

import os
import runpy
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import lifecycle  # noqa: E402

kill_at, script = int(sys.argv[1]), sys.argv[2]
save = lifecycle.save_checkpoint


def save_then_die(out_dir, step, *args, **kwargs):
    path = save(out_dir, step, *args, **kwargs)
    if step == kill_at:
        os._exit(137)
    return path


lifecycle.save_checkpoint = save_then_die
sys.argv = sys.argv[2:]
runpy.run_path(str(ROOT / script), run_name="__main__")
