"""The train step of this checkout against another checkout of the library (`baseline`: a git
worktree of an earlier commit, `git worktree add --detach DIR COMMIT`), one process per
measurement, which of the two runs first alternating round by round so that a machine's drift
falls on both alike (the program is bench/versus_code.py). Each process imports `cagem_tf`
from its own checkout and runs that checkout's `throughput` child on the same row: by default
the training program's (paper size, the labelled step, ten steps per call, the threads the
programs pick for this CPU).
"""

import os
import statistics
import subprocess
import time

from cagem_tf import cpu
from cagem_tf.benchmark import throughput

CHILD = os.path.join("cagem_tf", "benchmark", "throughput.py")


def program_row(size: dict = throughput.PAPER, labels: int = throughput.TRAIN["labels"]) -> dict:
    """The train row of the training program: its threads on this CPU, `size`, `labels`."""
    intra, inter = cpu.default_threads()
    return {**throughput.TRAIN, **size, "labels": labels, "intra": intra, "inter": inter}


def check_baseline(baseline: str) -> None:
    if not os.path.isfile(os.path.join(baseline, CHILD)):
        raise ValueError(f"{baseline}: no {CHILD} there; give another checkout of this "
                         "project (git worktree add --detach DIR COMMIT)")


def _commit(root: str) -> str:
    def git(*args):
        try:
            return subprocess.run(["git", "-C", root, *args], capture_output=True,
                                  text=True).stdout.strip()
        except OSError:  # no git on this machine
            return ""
    dirty = git("status", "--porcelain", "--untracked-files=no")
    return (git("rev-parse", "--short", "HEAD") or "not a git checkout") + \
        (" with changes" if dirty else "")


def run(baseline: str, rounds: int, spec: dict, out=print) -> dict:
    """Prints one Markdown table: examples/s per round and the median of each checkout, and
    this checkout's over the baseline's per round with their median. Returns the lists."""
    check_baseline(baseline)
    checkouts = {"this checkout": throughput.ROOT, "baseline": os.path.abspath(baseline)}
    speeds = {name: [] for name in checkouts}
    for r in range(rounds):
        for name in (list(checkouts) if r % 2 == 0 else list(checkouts)[::-1]):
            result = throughput.run_child("train", spec, checkout=checkouts[name])
            speeds[name].append(result["examples_per_s"])
    ratios = [a / b for a, b in zip(speeds["this checkout"], speeds["baseline"])]
    out(f"{throughput.machine()}; {time.strftime('%Y-%m-%d')}; train step: "
        f"{throughput._describe('train', spec)}, batch {spec['batch']} + {spec['labels']} "
        f"labelled, {spec['steps_per_execution']} steps per call; median of "
        f"{throughput.SETTINGS['windows']} windows of "
        f"{throughput.SETTINGS['steps']} steps per process; {rounds} rounds, which checkout "
        "runs first alternating")
    out("\n| checkout | commit | examples/s per round | median |\n|---|---|---|---|")
    for name, root in checkouts.items():
        out(f"| {name} ({root}) | {_commit(root)} | "
            f"{', '.join(f'{v:.0f}' for v in speeds[name])} | "
            f"{statistics.median(speeds[name]):.0f} |")
    out(f"| this checkout / baseline | | {', '.join(f'{v:.2f}' for v in ratios)} | "
        f"{statistics.median(ratios):.2f}x |")
    return {**speeds, "ratios": ratios}
