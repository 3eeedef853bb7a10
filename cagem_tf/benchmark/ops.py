"""Where the time of a train step or a serving call goes, by TensorFlow op type.

The TensorFlow profiler traces a few calls; its host trace (the `.xplane.pb` of the log
directory) holds one event per op execution on TensorFlow's compute threads, named
`node:OpType`. Summed by op type they give each type's share of the op time, and their sum
over the traced wall time the average number of ops running at once: the cores kept busy when
each op runs on one thread (`--intra_op_threads 1`); with more intra-op threads an op may itself
use several cores, which this does not count. The program is bench/ops.py.
"""

import collections
import glob
import os
import time

# The executor's own event on the compute threads, around the ops it runs: not an op.
_EXECUTOR = "Process"
# oneDNN's rewrites of an op type on some CPUs (_MklMatMul, _MklNativeFusedBatchNormV3): one
# name per op type, so tables of different machines compare.
_ONEDNN_PREFIXES = ("_MklNative", "_Mkl")


def op_seconds(logdir: str) -> dict[str, float]:
    """{op type: seconds summed over its executions} from the newest trace under `logdir`."""
    from tensorflow.tsl.profiler.protobuf import xplane_pb2
    traces = sorted(glob.glob(os.path.join(logdir, "plugins", "profile", "*", "*.xplane.pb")))
    if not traces:
        raise RuntimeError(f"no profiler trace under {logdir}")
    space = xplane_pb2.XSpace()
    with open(traces[-1], "rb") as f:
        space.ParseFromString(f.read())
    totals = collections.Counter()
    for plane in space.planes:
        names = {k: v.name for k, v in plane.event_metadata.items()}
        for line in plane.lines:
            if not line.name.startswith("tf_Compute"):
                continue
            for event in line.events:
                name = names.get(event.metadata_id, "")
                op = name.rsplit(":", 1)[-1]
                for prefix in _ONEDNN_PREFIXES:
                    op = op.removeprefix(prefix)
                if ":" in name and op != _EXECUTOR:
                    totals[op] += event.duration_ps * 1e-12
    return dict(totals)


def profile(fn, logdir: str) -> dict:
    """One call of fn untraced, then one traced (fn's functions already traced and warm):
    {"wall_s": the untraced call's seconds, "traced_wall_s", "ops": {type: s}}."""
    import tensorflow as tf
    start = time.perf_counter()
    fn()
    wall = time.perf_counter() - start
    tf.profiler.experimental.start(logdir)
    start = time.perf_counter()
    fn()
    traced = time.perf_counter() - start
    tf.profiler.experimental.stop()
    return {"wall_s": wall, "traced_wall_s": traced, "ops": op_seconds(logdir)}


def table(result: dict, calls: int, top: int = 12) -> str:
    """Markdown: each op type's milliseconds per call and share of the op time, the `top`
    largest, the rest summed; then the wall time per call, untraced and traced, and the ops
    running at once (op time / traced wall time)."""
    ops, wall = result["ops"], result["wall_s"]
    total = sum(ops.values())
    ranked = sorted(ops.items(), key=lambda kv: -kv[1])
    rows = ranked[:top] + ([("(other ops)", sum(s for _, s in ranked[top:]))]
                           if len(ranked) > top else [])
    lines = ["| op type | ms per call | share of op time |", "|---|---|---|"]
    lines += [f"| {op} | {1000 * s / calls:.1f} | {100 * s / total:.1f}% |" for op, s in rows]
    lines.append(f"| all ops | {1000 * total / calls:.1f} | 100% |")
    traced = result["traced_wall_s"]
    lines.append(f"\nwall time {1000 * wall / calls:.1f} ms per call ({1000 * traced / calls:.1f} "
                 f"traced); ops running at once {total / traced:.2f} on average while traced")
    return "\n".join(lines)


def train_step(spec: dict, steps: int, logdir: str) -> dict:
    """The profile of `steps` train steps of the bench's model of `spec` (the keys of
    `throughput.TRAIN`, hidden widths `lower` and `upper`) on a constant batch."""
    from cagem_tf.benchmark import throughput
    throughput._threads(spec)
    throughput.SETTINGS["steps"] = steps
    _, run = throughput._trainer(spec, False)
    run(1)  # warm
    return profile(lambda: run(1), logdir)


def saved_model(path: str, signature: str, rows: int, calls: int, logdir: str) -> dict:
    """The profile of `calls` calls of a SavedModel signature on `rows` random binary images
    (seeds 0..rows-1, cluster 0 where it takes them)."""
    import numpy as np
    import tensorflow as tf
    fn = tf.saved_model.load(path).signatures[signature]
    specs = fn.structured_input_signature[1]
    inputs = {"x": tf.constant((np.random.default_rng(0).random(
                  (rows, *specs["x"].shape[1:])) < 0.3).astype(np.float32)),
              "seed": tf.range(rows, dtype=tf.int32), "y": tf.zeros([rows], tf.int32)}
    args = {name: inputs[name] for name in specs}
    fn(**args)

    def run():
        for _ in range(calls):
            fn(**args)
    return profile(run, logdir)
