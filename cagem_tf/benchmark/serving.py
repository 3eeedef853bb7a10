"""Rows per second and latency of an exported SavedModel's signatures, by batch size N.

Measured with TensorFlow alone in a child process per (export, round), alternating exports
between rounds so that a machine's drift falls on every export alike.
"""

import json
import os
import subprocess
import sys

from cagem_tf.files import UserError

_CHILD = r"""
import json, sys, time
import numpy as np, tensorflow as tf
path, signature, sizes, calls = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), int(sys.argv[4])
m = tf.saved_model.load(path)
fn = m.signatures[signature]
specs = fn.structured_input_signature[1]
out = {}
for n in sizes:
    # x: random binary images; seed: 0..N-1; y: cluster 0 for every row.
    inputs = {"x": lambda: tf.constant((np.random.default_rng(0).random(
                  (n, *specs["x"].shape[1:])) < 0.3).astype(np.float32)),
              "seed": lambda: tf.range(n, dtype=tf.int32),
              "y": lambda: tf.zeros([n], tf.int32)}
    args = {name: inputs[name]() for name in specs}
    fn(**args)  # traced and warm
    times = []
    for _ in range(calls):
        start = time.perf_counter(); fn(**args); times.append(time.perf_counter() - start)
    median = float(np.median(times))
    out[n] = {"rows_per_second": n / median, "latency_ms": 1000 * median}
print("RESULT" + json.dumps(out))
"""


def check(paths) -> None:
    """Raises a one-line UserError unless every path is a SavedModel directory (before any
    measurement starts, so that a typo does not surface after an hour of benchmarking)."""
    for path in paths:
        if not os.path.isfile(os.path.join(path, "saved_model.pb")):
            raise UserError(f"--saved_model {path}: no saved_model.pb there; give export "
                            "version directories (RUN/export/<n>), without '~' after a comma")


def measure(path: str, signature: str, sizes, calls: int = 7) -> dict:
    """{N: {"rows_per_second", "latency_ms"}} of `signature` (inputs x, seed and y) of the SavedModel
    at `path`, the median of `calls` timed calls per N, in a fresh process."""
    result = subprocess.run([sys.executable, "-c", _CHILD, path, signature,
                             json.dumps(list(sizes)), str(calls)],
                            capture_output=True, text=True, timeout=3600)
    lines = [l for l in result.stdout.splitlines() if l.startswith("RESULT")]
    if not lines:
        raise RuntimeError(f"serving bench failed: {result.stderr[-2000:]}")
    return {int(n): v for n, v in json.loads(lines[0][len("RESULT"):]).items()}


def table(rows) -> str:
    """Markdown of [(label, signature, {N: {...}}), ...]: rows/s and latency by N."""
    sizes = sorted({n for _, _, values in rows for n in values})
    lines = ["| export | signature | " + " | ".join(f"N = {n}: rows/s (ms)" for n in sizes) + " |",
             "|---|---|" + "---|" * len(sizes)]
    for label, signature, values in rows:
        lines.append(f"| {label} | {signature} | " + " | ".join(
            f"{values[n]['rows_per_second']:,.0f} ({values[n]['latency_ms']:.1f})"
            for n in sizes) + " |")
    return "\n".join(lines)
