"""Run a script and die like a SIGKILLed process when it calls sampling.sample for the N-th time (0:
never), writing one line per call to the file $SAMPLE_CALLS_LOG, so that "killed, then rerun ==
uninterrupted" and "nothing drawn twice" are tested deterministically:

    python tests/_kill_after_samples.py N script.py [flags...]
"""

import os
import runpy
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import sampling  # noqa: E402

kill_at, script = int(sys.argv[1]), sys.argv[2]
original, calls = sampling.sample, [0]


def counted_sample(*args, **kwargs):
    calls[0] += 1
    if calls[0] == kill_at:
        os._exit(137)
    with open(os.environ["SAMPLE_CALLS_LOG"], "a") as f:
        f.write(f"{calls[0]}\n")
    return original(*args, **kwargs)


sampling.sample = counted_sample
sys.argv = sys.argv[2:]
runpy.run_path(str(ROOT / script), run_name="__main__")
