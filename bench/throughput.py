"""Throughput of the data pipeline, the CaGeM train step and the IW bound; prints a Markdown table.

python bench/throughput.py [--dataset mnist|PATH] [--sizes 1024x512,500x256] [--clusters 10]
                           [--steps 40] [--iw_samples 5000] [--iw_images 4]

Each model measurement runs in a fresh subprocess, so that the peak resident memory it reports
(ru_maxrss) belongs to that configuration alone. Timings exclude tracing: the first epoch of a
fit (or the first call of a tf.function) is run and discarded.
"""

import json
import os
import platform
import resource
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

flags.DEFINE_string("dataset", None, "Data for the pipeline measurement (a data.load name or "
                    "path); default: random MNIST-shaped images.")
flags.DEFINE_string("manual_dir", None, "tfds manual_dir for --dataset.")
flags.DEFINE_string("data_dir", None, "tfds data_dir for --dataset.")
flags.DEFINE_list("sizes", ["1024x512", "500x256"], "hidden_lower x hidden_upper widths.")
flags.DEFINE_list("clusters", ["10"], "Values of K.")
flags.DEFINE_integer("batch_size", 100, "Unlabelled batch size of the train step.")
flags.DEFINE_integer("labels", 100, "Labelled examples (labelled batch min(100, labels)).")
flags.DEFINE_integer("steps", 40, "Timed train steps per configuration.")
flags.DEFINE_integer("iw_samples", 5000, "Importance samples per test image; 0 skips.")
flags.DEFINE_integer("iw_images", 4, "Test images timed for the IW bound.")
flags.DEFINE_integer("iw_chunk", 100, "Samples per chunk of the IW bound.")
flags.DEFINE_string("_child", None, "Internal: one measurement as JSON.")
FLAGS = flags.FLAGS


def _mnist_like():
    import numpy as np
    from cagem_tf import data
    if FLAGS.dataset:
        return data.load(FLAGS.dataset, FLAGS.data_dir, FLAGS.manual_dir, log=lambda m: None)
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (60000, 28, 28), dtype=np.uint8)
    y = np.arange(60000) % 10
    return data._checked({"x_train": x, "y_train": y, "x_test": x[:10000],
                          "y_test": y[:10000]}, "random")


def measure_pipeline():
    from cagem_tf import data
    arrays = _mnist_like()
    labelled = data.labelled_indices(arrays.y_train, FLAGS.labels, arrays.num_classes, 0)
    streams = data.streams(arrays, labelled, FLAGS.batch_size)
    for _ in streams.train.take(5):
        pass
    start = time.perf_counter()
    steps = sum(1 for _ in streams.train)
    seconds = time.perf_counter() - start
    return {"what": "data pipeline (one epoch, with labelled batches)",
            "examples_per_s": steps * FLAGS.batch_size / seconds}


def measure_model(spec):
    import keras
    import numpy as np
    import tensorflow as tf
    from cagem_tf import CaGeM
    lower, upper, K = spec["lower"], spec["upper"], spec["clusters"]
    model = CaGeM(num_clusters=K, hidden_lower=lower, hidden_upper=upper, seed=0)
    rng = np.random.default_rng(0)
    n_l = min(100, FLAGS.labels)
    batch = {"x": (rng.random((FLAGS.batch_size, 28, 28, 1)) < 0.2).astype(np.float32)}
    if n_l:
        batch["x_labelled"] = (rng.random((n_l, 28, 28, 1)) < 0.2).astype(np.float32)
        batch["y_labelled"] = (np.arange(n_l) % K).astype(np.int32)
    model.compile(keras.optimizers.Adam(1e-3), alpha=1.0 if n_l else 0.0)
    data = tf.data.Dataset.from_tensors(batch).repeat()
    model.fit(data, steps_per_epoch=3, epochs=1, verbose=0)  # tracing
    start = time.perf_counter()
    model.fit(data, steps_per_epoch=FLAGS.steps, epochs=1, verbose=0)
    seconds = time.perf_counter() - start
    result = {"what": f"train step, hidden {lower}/{upper}, K={K}",
              "examples_per_s": FLAGS.steps * FLAGS.batch_size / seconds,
              "epoch_s_mnist": 60000 / (FLAGS.steps * FLAGS.batch_size / seconds)}
    if FLAGS.iw_samples:
        x = tf.constant(batch["x"][:FLAGS.iw_images])
        bound = tf.function(lambda x: model.iw_bound(x, FLAGS.iw_samples, FLAGS.iw_chunk,
                                                     seed=tf.constant([0, 0])))
        bound(x[:1]).numpy()
        bound(x).numpy()  # traced for this batch shape
        start = time.perf_counter()
        bound(x).numpy()
        seconds = time.perf_counter() - start
        result["iw_images_per_s"] = FLAGS.iw_images / seconds
        result["iw_full_test_h"] = 10000 * seconds / FLAGS.iw_images / 3600
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return result


def child(spec_json):
    spec = json.loads(spec_json)
    result = measure_pipeline() if spec["kind"] == "pipeline" else measure_model(spec)
    print("RESULT" + json.dumps(result))


def run_child(spec):
    args = [sys.executable, os.path.abspath(__file__), *sys.argv[1:],
            f"--_child={json.dumps(spec)}"]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    out = subprocess.run(args, capture_output=True, text=True, env=env)
    lines = [l for l in out.stdout.splitlines() if l.startswith("RESULT")]
    if not lines:
        sys.exit(f"measurement {spec} failed:\n{out.stderr[-2000:]}")
    return json.loads(lines[0][len("RESULT"):])


def main(argv):
    if FLAGS._child:
        return child(FLAGS._child)
    specs = [{"kind": "pipeline"}]
    for size in FLAGS.sizes:
        lower, upper = (int(w) for w in size.split("x"))
        for k in FLAGS.clusters:
            specs.append({"kind": "model", "lower": lower, "upper": upper, "clusters": int(k)})
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
          f"{time.strftime('%Y-%m-%d')}; batch {FLAGS.batch_size} (+ labelled "
          f"{min(100, FLAGS.labels)}); IW S={FLAGS.iw_samples}, chunk {FLAGS.iw_chunk}\n")
    print("| measurement | examples/s | s per MNIST epoch | IW test images/s | IW full test (h) "
          "| peak RSS (MB) |")
    print("|---|---|---|---|---|---|")
    for spec in specs:
        r = run_child(spec)
        cell = lambda key, fmt: fmt.format(r[key]) if key in r else "-"
        print(f"| {r['what']} | {r['examples_per_s']:.0f} | {cell('epoch_s_mnist', '{:.0f}')} | "
              f"{cell('iw_images_per_s', '{:.2f}')} | {cell('iw_full_test_h', '{:.1f}')} | "
              f"{cell('peak_rss_mb', '{:.0f}')} |", flush=True)


if __name__ == "__main__":
    app.run(main)
