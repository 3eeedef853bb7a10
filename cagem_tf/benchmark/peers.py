"""The library's unlabelled train step (with TensorFlow's default threads and with the threads
the programs pick for this CPU, `cpu.default_threads`) against the same network in PyTorch
(eager and torch.compile, `torch_peer`), alternating processes round by round so that a
machine's drift falls on every variant alike (the program is bench/versus_torch.py).

PyTorch runs from another Python (`torch_python`, the benchmark's own environment): it is never
a dependency of the package.
"""

import json
import os
import statistics
import subprocess

from cagem_tf import cpu
from cagem_tf.benchmark import throughput

SIZES = (throughput.PAPER, throughput.SMALL)
# The programs' threads when no flag is given (on more than 2 cores TensorFlow's own, 0 / 0).
THREADS = dict(zip(("intra", "inter"), cpu.default_threads()))
VARIANTS = ("cagem-tf",
            "cagem-tf, the programs' threads (intra {intra} / inter {inter})".format(**THREADS),
            "PyTorch eager", "PyTorch torch.compile")


def _torch_child(torch_python: str, spec: dict) -> dict:
    env = dict(os.environ, PYTHONPATH=throughput.ROOT)
    out = subprocess.run([torch_python, "-m", "cagem_tf.benchmark.torch_peer", json.dumps(spec)],
                         capture_output=True, text=True, env=env, timeout=3600)
    lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT")]
    if not lines:
        raise RuntimeError(f"the PyTorch peer failed:\n{out.stderr[-3000:]}")
    return json.loads(lines[0][len("RESULT"):])


def measure(torch_python: str, size: dict, steps: int, windows: int) -> dict:
    """examples/s of each variant at `size` ({"lower", "upper"}), one process each."""
    throughput.SETTINGS.update(steps=steps, windows=windows)
    ours = throughput.run_child("train", {**throughput.TRAIN, **size, "labels": 0})
    threads = throughput.run_child("train", {**throughput.TRAIN, **size, "labels": 0, **THREADS})
    spec = {**size, "clusters": throughput.TRAIN["clusters"], "batch": throughput.TRAIN["batch"],
            "steps": steps, "windows": windows}
    eager = _torch_child(torch_python, spec)
    compiled = _torch_child(torch_python, {**spec, "compile": True})
    return {"cagem-tf": ours["examples_per_s"], VARIANTS[1]: threads["examples_per_s"],
            "PyTorch eager": eager["examples_per_s"],
            "PyTorch torch.compile": compiled["examples_per_s"], "torch": eager["torch"],
            "matmul_fraction": ours["fraction"], "matmul_fraction_threads": threads["fraction"]}


def run(torch_python: str, rounds: int = 3, steps: int = 15, windows: int = 5, out=print):
    """Prints one Markdown table: examples/s per round and their median, per size and variant,
    with the ratio of the library's median to each peer's."""
    results = {}
    for _ in range(rounds):
        for size in SIZES:
            key = f"{size['lower']}/{size['upper']}"
            results.setdefault(key, []).append(measure(torch_python, size, steps, windows))
    first = next(iter(results.values()))[0]
    out(f"{throughput.machine()}, PyTorch {first['torch']}; "
        f"unlabelled step, K = {throughput.TRAIN['clusters']}, batch {throughput.TRAIN['batch']}, "
        f"float32, TensorFlow's default threads unless named, "
        f"{throughput.TRAIN['steps_per_execution']} steps per call (the training program's); "
        f"median of {windows} windows of {steps} steps per process; {rounds} rounds, the "
        "variants alternating")
    out("\n| size | variant | examples/s per round | median | cagem-tf / variant |\n"
        "|---|---|---|---|---|")
    for key, rows in results.items():
        medians = {v: statistics.median(r[v] for r in rows) for v in VARIANTS}
        for v in VARIANTS:
            out(f"| {key} | {v} | {', '.join(f'{r[v]:.0f}' for r in rows)} | "
                f"{medians[v]:.0f} | {medians['cagem-tf'] / medians[v]:.2f}x |")
        for label, field in (("cagem-tf", "matmul_fraction"),
                             (VARIANTS[1], "matmul_fraction_threads")):
            fractions = ", ".join(f"{100 * r[field]:.0f}%" for r in rows)
            out(f"| {key} | {label}: share of the step in matmuls (per round) | {fractions} | "
                f"| |")
