"""Speed and memory of the data pipeline, the CaGeM train step and the IW bound, as Markdown
tables (the program is bench/throughput.py).

Tables: the data pipeline alone; the dense matmul rate of this CPU through TensorFlow; the train
step (examples/s, the analytic FLOPs of `flops`, the fraction of the matmul rate measured on
the step's own matmul shapes, peak memory) against K, hidden sizes, batch size, thread settings,
XLA, and the straightforward reference of `reference`; Keras' Adam beside the fused one
(`cagem_tf.optimizer`); float32 beside mixed_bfloat16 by width;
the step for 8-bit and colour images and convolutional networks (speed and memory); the
library's step against that
reference in alternating windows of one process; the IW bound (test images/s and the projected
time for the 10,000 MNIST test images) against estimator, S, chunk size, images per call, K and
XLA.

Each measurement runs in a fresh subprocess (`python -m cagem_tf.benchmark.throughput ROW`), so
that its peak resident memory (ru_maxrss) and its thread settings are its own; a train step with
the same settings in two tables (train, optimizer, precision) is measured once. Timings exclude
tracing (a first call is run and discarded) and are medians over windows, which keeps a passing
stall of the machine out of the numbers.

`settings`: suite ("full" or "quick"), only (tables), dataset, manual_dir, data_dir, steps,
windows, iw_images, repeats: the flags of bench/throughput.py.
"""

import json
import os
import resource
import subprocess
import sys
import time

from cagem_tf import cpu
from cagem_tf.config import Config

SETTINGS = {"suite": "full", "only": [], "dataset": None, "manual_dir": None, "data_dir": None,
            "steps": 15, "windows": 5, "iw_images": 4, "repeats": 3}
# The checkout this library runs from (the directory that holds cagem_tf/).
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PAPER = {"lower": 1024, "upper": 512}
SMALL = {"lower": 500, "upper": 256}
TRAIN = {"clusters": 10, "batch": 100, "labels": 100, "intra": 0, "inter": 0, "xla": False,
         "tiled": False, "precision": "float32", "likelihood": "bernoulli",
         "architecture": "mlp", "channels": 1, "optimizer": "fused",
         "steps_per_execution": Config.steps_per_execution}  # the training program's
IW = {"clusters": 10, "estimator": "exact", "samples": 5000, "chunk": None, "images": None,
      "xla": False, "intra": 0, "inter": 0}
TEST_IMAGES = 10000


def suite():
    """The rows: (table, spec) with spec overriding the defaults above."""
    if SETTINGS["suite"] == "quick":
        tiny = {"lower": 64, "upper": 32}
        # The tiled reference runs in the versus row (its full-suite train row is left out).
        return [("pipeline", {}), ("matmul", {}), ("train", {**tiny}),
                ("optimizer", {**tiny, "optimizer": "keras"}), ("optimizer", {**tiny}),
                ("precision", {**tiny}), ("precision", {**tiny, "precision": "mixed_bfloat16"}),
                ("images", {**tiny, "likelihood": "discretized_logistic",
                            "architecture": "conv", "channels": 3}),
                ("versus", {**tiny}),
                ("iw", {**tiny, "samples": 200}),
                ("iw", {**tiny, "samples": 200, "estimator": "sampled"})]
    rows = [("pipeline", {}), ("matmul", {})]
    for size in (PAPER, SMALL):
        for k in (10, 20, 50):
            rows.append(("train", {**size, "clusters": k}))
        rows.append(("train", {**size, "tiled": True}))
    rows += [("train", {**PAPER, "batch": b}) for b in (50, 200, 500)]
    rows += [("train", {**PAPER, "intra": i, "inter": j}) for i, j in ((1, 1), (2, 1), (1, 2))]
    rows += [("train", {**PAPER, "xla": True})]
    rows += [("train", {**size, "steps_per_execution": 1}) for size in (PAPER, SMALL)]
    # Keras' Adam beside the fused one, at both sizes.
    rows += [("optimizer", {**size, "optimizer": o}) for size in (PAPER, SMALL)
             for o in ("keras", "fused")]
    # float32 beside mixed_bfloat16 at widths on and off the multiples of 16 bfloat16 kernels want.
    rows += [("precision", {**size, "precision": p})
             for size in (PAPER, SMALL, {"lower": 512, "upper": 256}, {"lower": 300, "upper": 100})
             for p in ("float32", "mixed_bfloat16")]
    # And with the threads the programs pick on this CPU, where they differ from TensorFlow's.
    intra, inter = cpu.default_threads()
    if intra or inter:
        rows += [("precision", {**size, "precision": p, "intra": intra, "inter": inter})
                 for size in (PAPER, SMALL) for p in ("float32", "mixed_bfloat16")]
    rows += [("images", {**SMALL, "likelihood": lik, "architecture": arch, "channels": c})
             for c in (1, 3) for arch in ("mlp", "conv")
             for lik in ("bernoulli", "discretized_logistic")]
    rows += [("versus", size) for size in (PAPER, SMALL)]
    rows += [("versus", {**PAPER, "intra": 1, "inter": 2})]
    for size in (PAPER, SMALL):
        for estimator in ("exact", "sampled"):
            rows.append(("iw", {**size, "estimator": estimator}))
    rows += [("iw", {**PAPER, "clusters": k}) for k in (20, 50)]
    rows += [("iw", {**PAPER, "estimator": "sampled", "clusters": k}) for k in (20, 50)]
    rows += [("iw", {**PAPER, "chunk": 500})]
    rows += [("iw", {**PAPER, "estimator": "sampled", "chunk": c}) for c in (100, 1000)]
    rows += [("iw", {**PAPER, "images": 16})]
    rows += [("iw", {**PAPER, "samples": 1000})]
    rows += [("iw", {**PAPER, "estimator": e, "intra": 1, "inter": 2})
             for e in ("exact", "sampled")]
    rows += [("iw", {**PAPER, "xla": True}),
             ("iw", {**PAPER, "estimator": "sampled", "xla": True})]
    return rows


# --------------------------------------------------------------------------------------------
# Measurements (each in its own process)
def _threads(spec):
    import tensorflow as tf
    if spec.get("intra"):
        tf.config.threading.set_intra_op_parallelism_threads(spec["intra"])
    if spec.get("inter"):
        tf.config.threading.set_inter_op_parallelism_threads(spec["inter"])


def _mnist_like():
    import numpy as np
    from cagem_tf import data
    if SETTINGS["dataset"]:
        return data.load(SETTINGS["dataset"], SETTINGS["data_dir"], SETTINGS["manual_dir"],
                         log=lambda m: None)
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (60000, 28, 28), dtype=np.uint8)
    y = np.arange(60000) % 10
    return data._checked({"x_train": x, "y_train": y, "x_test": x[:10000],
                          "y_test": y[:10000]}, "random")


def measure_pipeline(spec):
    from cagem_tf import data
    arrays = _mnist_like()
    labelled = data.labelled_indices(arrays.y_train, TRAIN["labels"], arrays.num_classes, 0)
    streams = data.streams(arrays, labelled, TRAIN["batch"])
    for _ in streams.train.take(5):
        pass
    start = time.perf_counter()
    steps = sum(1 for _ in streams.train)
    seconds = time.perf_counter() - start
    return {"examples_per_s": steps * TRAIN["batch"] / seconds}


def _time(fn, repeats, warm_up=True):
    """Median seconds of `repeats` calls, after one discarded call (tracing, warm-up) unless
    the caller has made it."""
    import numpy as np
    if warm_up:
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def matmul_seconds(matmuls, repeats=7, dtype="float32"):
    """Seconds for exactly the given matmuls (forward, kernel and input gradients) in one
    tf.function, on random inputs of their shapes, in `dtype`."""
    import tensorflow as tf
    rng = tf.random.Generator.from_seed(0)
    products = []
    for m in matmuls:
        a, w = (tf.cast(rng.normal(s), dtype) for s in ([m.rows, m.n_in], [m.n_in, m.n_out]))
        g = tf.cast(rng.normal([m.rows, m.n_out]), dtype)
        products.append((a, w, False, False))
        if m.grad_kernel:
            products.append((a, g, True, False))                  # a^T g  [n_in, n_out]
        if m.grad_input:
            products.append((g, w, False, True))                  # g w^T  [rows, n_in]

    @tf.function
    def run():
        # One element of each product keeps every matmul without copying the results out.
        return tf.add_n([tf.cast(tf.matmul(a, b, transpose_a=ta, transpose_b=tb)[0, 0],
                                 tf.float32) for a, b, ta, tb in products])

    return _time(lambda: run().numpy(), repeats)


def measure_matmul(spec):
    from cagem_tf.benchmark.flops import Matmul
    out = {}
    for n in (512, 1024, 2048):
        square = [Matmul("square", n, n, n, False, False)]
        for dtype in ("float32", "bfloat16"):
            out[f"square_{n}_{dtype}_gflops"] = 2 * n ** 3 / matmul_seconds(square,
                                                                            dtype=dtype) / 1e9
    return out


def _config(spec):
    from cagem_tf import CaGeM
    return CaGeM(num_clusters=spec["clusters"], hidden_lower=spec["lower"],
                 hidden_upper=spec["upper"], seed=0)


def _window_timer():
    """A Keras callback that records the seconds of each epoch of a fit (one timed window).
    Built on demand: the parent process never imports Keras."""
    import keras

    class WindowTimer(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.seconds = []

        def on_epoch_begin(self, epoch, logs=None):
            self.start = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            self.seconds.append(time.perf_counter() - self.start)

    return WindowTimer()


def _trainer(spec, tiled):
    """A compiled model of `spec` on a constant batch, traced; returns (model, run) where
    run(windows) gives the seconds per step of each window."""
    import keras
    import numpy as np
    import tensorflow as tf
    from cagem_tf.benchmark.reference import TiledCaGeM
    from cagem_tf import CaGeM, optimizer
    cls = TiledCaGeM if tiled else CaGeM
    shape = (28, 28, spec["channels"])
    model = cls(num_clusters=spec["clusters"], hidden_lower=spec["lower"],
                hidden_upper=spec["upper"], seed=0, precision=spec["precision"],
                likelihood=spec["likelihood"], architecture=spec["architecture"],
                image_shape=shape)
    rng = np.random.default_rng(0)
    B, L, K = spec["batch"], min(100, spec["labels"]), spec["clusters"]
    # Binary images, or 8-bit levels / 255 for the discretized likelihood.
    images = (lambda n: (rng.random((n, *shape)) < 0.2).astype(np.float32)) \
        if spec["likelihood"] == "bernoulli" else \
        (lambda n: (rng.integers(0, 256, (n, *shape)) / 255).astype(np.float32))
    batch = {"x": images(B)}
    if L:
        batch["x_labelled"] = images(L)
        batch["y_labelled"] = (np.arange(L) % K).astype(np.int32)
    adam = optimizer.Adam if spec["optimizer"] == "fused" else keras.optimizers.Adam
    model.compile(adam(1e-3), alpha=1.0 if L else 0.0,
                  jit_compile=spec["xla"], steps_per_execution=spec["steps_per_execution"])
    # Finite windows: with several steps per call, a window ends where its data does.
    one = tf.data.Dataset.from_tensors(batch)
    model.fit(one.repeat(3), epochs=1, verbose=0)  # tracing

    def run(windows):
        timer = _window_timer()
        model.fit(one.repeat(SETTINGS["steps"]), epochs=windows, verbose=0,
                  callbacks=[timer])
        return [t / SETTINGS["steps"] for t in timer.seconds]

    return model, run


def measure_train(spec):
    import numpy as np
    from cagem_tf.benchmark.flops import total_macs, train_matmuls
    _threads(spec)
    model, run = _trainer(spec, spec["tiled"])
    seconds = float(np.median(run(SETTINGS["windows"])))
    B, L = spec["batch"], min(100, spec["labels"])
    matmuls = train_matmuls(model.get_config(), B, L, tiled=spec["tiled"])
    flops = 2 * total_macs(matmuls)
    matmul_s = matmul_seconds(matmuls, dtype="bfloat16" if "bfloat16" in spec["precision"]
                              else "float32")
    return {"examples_per_s": B / seconds, "epoch_s": 60000 / (B / seconds),
            "gflop_per_step": flops / 1e9, "gflops": flops / seconds / 1e9,
            "matmul_gflops": flops / matmul_s / 1e9, "fraction": matmul_s / seconds,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def measure_images(spec):
    """The train step for other images and networks (likelihood, architecture, channels):
    speed and memory only (the FLOP count covers the MLP of binary grey images)."""
    import numpy as np
    _threads(spec)
    _, run = _trainer(spec, False)
    seconds = float(np.median(run(SETTINGS["windows"])))
    return {"examples_per_s": spec["batch"] / seconds, "epoch_s": 60000 * seconds / spec["batch"],
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def measure_versus(spec):
    """The library's step against the tiled reference, alternating windows in one process so
    that both see the same machine state; the speed-up is the median of the per-round ratios."""
    import numpy as np
    from cagem_tf.benchmark.flops import total_macs, train_matmuls
    _threads(spec)
    ours, run_ours = _trainer(spec, False)
    _, run_reference = _trainer(spec, True)
    t_ours, t_reference = [], []
    for _ in range(SETTINGS["windows"]):
        t_ours += run_ours(1)
        t_reference += run_reference(1)
    B, L = spec["batch"], min(100, spec["labels"])
    macs = total_macs(train_matmuls(ours.get_config(), B, L))
    macs_reference = total_macs(train_matmuls(ours.get_config(), B, L, tiled=True))
    return {"ours": B / float(np.median(t_ours)),
            "reference": B / float(np.median(t_reference)),
            "time_saved": float(np.median(1 - np.array(t_ours) / np.array(t_reference))),
            "macs_saved": 1 - macs / macs_reference}


def measure_iw(spec):
    _threads(spec)
    import numpy as np
    import tensorflow as tf
    from cagem_tf.benchmark.flops import iw_matmuls, total_macs
    model = _config(spec)
    n = spec["images"] or SETTINGS["iw_images"]
    x = tf.constant((np.random.default_rng(0).random((n, 784)) < 0.2).astype(np.float32))
    bound = tf.function(lambda x, s: model.iw_bound(x, s, spec["chunk"],
                                                    seed=tf.constant([0, 0]),
                                                    estimator=spec["estimator"]),
                        jit_compile=spec["xla"])
    bound(x, tf.constant(1)).numpy()  # tracing, one chunk
    samples = tf.constant(spec["samples"])
    seconds = _time(lambda: bound(x, samples).numpy(), SETTINGS["repeats"], warm_up=False)
    flops = 2 * total_macs(iw_matmuls(model.get_config(), n, spec["samples"],
                                      spec["estimator"]))
    return {"images_per_s": n / seconds, "full_test_h": TEST_IMAGES * seconds / n / 3600,
            "gflops": flops / seconds / 1e9,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


# Tables whose rows measure another table's quantity (the train step).
SAME_MEASUREMENT = {"precision": "train", "optimizer": "train"}


def child(payload):
    table, spec, settings = json.loads(payload)
    SETTINGS.update(settings)
    measure = {"pipeline": measure_pipeline, "matmul": measure_matmul, "train": measure_train,
               "images": measure_images, "versus": measure_versus,
               "iw": measure_iw}[SAME_MEASUREMENT.get(table, table)]
    print("RESULT" + json.dumps(measure(spec)))


def run_child(table, spec, checkout: str | None = None):
    """One measurement in a fresh process; `checkout`: the root of another checkout of the
    library to import it from (its own child runs; `python -m` starts in that directory)."""
    args = [sys.executable, "-m", "cagem_tf.benchmark.throughput",
            json.dumps([table, spec, SETTINGS])]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    if checkout:
        env["PYTHONPATH"] = checkout
    out = subprocess.run(args, capture_output=True, text=True, env=env, cwd=checkout)
    lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT")]
    if not lines:
        raise RuntimeError(f"measurement {table} {spec} failed:\n{out.stderr[-3000:]}")
    return json.loads(lines[0][len("RESULT"):])


# --------------------------------------------------------------------------------------------
# Tables
def _describe(table, spec):
    defaults = IW if table == "iw" else TRAIN
    parts = [f"{spec['lower']}/{spec['upper']}", f"K={spec['clusters']}"]
    for key in ("batch", "estimator", "samples", "chunk", "images"):
        if key in spec and spec[key] != defaults[key]:
            parts.append(f"{key} {spec[key]}")
    if spec.get("intra") or spec.get("inter"):
        parts.append(f"threads intra {spec['intra'] or 'default'} / inter "
                     f"{spec['inter'] or 'default'}")
    if spec.get("xla"):
        parts.append("XLA")
    if spec.get("steps_per_execution", TRAIN["steps_per_execution"]) != \
            TRAIN["steps_per_execution"]:
        parts.append(f"{spec['steps_per_execution']} step(s) per call")
    if spec.get("optimizer", "fused") != "fused":
        parts.append("**Keras' Adam** (eight elementwise ops per variable)")
    elif table == "optimizer":
        parts.append("fused Adam (`cagem_tf.optimizer`)")
    if spec.get("tiled"):
        parts.append("**reference (tiled)**")
    if spec.get("precision", "float32") != "float32":
        parts.append(f"**{spec['precision']}**")
    elif table == "precision":
        parts.append("float32")
    return ", ".join(parts)


def _train_row(s, r, table="train"):
    return (f"| {_describe(table, s)} | {r['examples_per_s']:.0f} | {r['epoch_s']:.0f} | "
            f"{r['gflop_per_step']:.1f} | {r['gflops']:.0f} | {r['matmul_gflops']:.0f} | "
            f"{100 * r['fraction']:.0f}% | {r['peak_rss_mb']:.0f} |")


HEADERS = {
    "pipeline": ("| data pipeline | examples/s |\n|---|---|",
                 lambda s, r: f"| one epoch of MNIST-shaped batches with labelled batches | "
                              f"{r['examples_per_s']:.0f} |"),
    "matmul": ("| square matmul n x n x n | float32 GFLOP/s at n=512 / 1024 / 2048 | "
               "bfloat16 GFLOP/s at n=512 / 1024 / 2048 |\n|---|---|---|",
               lambda s, r: "| tf.matmul | " + " / ".join(
                   f"{r[f'square_{n}_float32_gflops']:.0f}" for n in (512, 1024, 2048))
               + " | " + " / ".join(f"{r[f'square_{n}_bfloat16_gflops']:.0f}"
                                     for n in (512, 1024, 2048)) + " |"),
    "train": ("| train step | examples/s | s per MNIST epoch | GFLOP per step | GFLOP/s | "
              "matmul GFLOP/s on the step's shapes | fraction of matmul rate | peak RSS (MB) |\n"
              "|---|---|---|---|---|---|---|---|",
              lambda s, r: _train_row(s, r)),
    "optimizer": ("| train step by optimizer | examples/s | s per MNIST epoch | GFLOP per step | "
                  "GFLOP/s | matmul GFLOP/s on the step's shapes | fraction of matmul rate | "
                  "peak RSS (MB) |\n|---|---|---|---|---|---|---|---|",
                  lambda s, r: _train_row(s, r, "optimizer")),
    "precision": ("| train step by precision | examples/s | s per MNIST epoch | GFLOP per step | "
                  "GFLOP/s | matmul GFLOP/s on the step's shapes | fraction of matmul rate | "
                  "peak RSS (MB) |\n|---|---|---|---|---|---|---|---|",
                  lambda s, r: _train_row(s, r, "precision")),
    "images": ("| train step, images and networks | examples/s | s per 60,000 images | "
               "peak RSS (MB) |\n|---|---|---|---|",
               lambda s, r: f"| {_describe('train', s)}, {s['likelihood']}, "
                            f"{s['architecture']}, 28x28x{s['channels']} | "
                            f"{r['examples_per_s']:.0f} | {r['epoch_s']:.0f} | "
                            f"{r['peak_rss_mb']:.0f} |"),
    "versus": ("| per-input projections vs tiled reference, alternating windows | ours "
               "examples/s | reference examples/s | step time saved | multiply-adds saved |\n"
               "|---|---|---|---|---|",
               lambda s, r: f"| {_describe('train', s)} | {r['ours']:.0f} | "
                            f"{r['reference']:.0f} | {100 * r['time_saved']:.1f}% | "
                            f"{100 * r['macs_saved']:.1f}% |"),
    "iw": ("| IW bound | test images/s | full MNIST test (h) | GFLOP/s | peak RSS (MB) |\n"
           "|---|---|---|---|---|",
           lambda s, r: f"| {_describe('iw', s)} | {r['images_per_s']:.2f} | "
                        f"{r['full_test_h']:.2f} | {r['gflops']:.0f} | {r['peak_rss_mb']:.0f} |"),
}


def machine() -> str:
    """The first words of every benchmark table: the CPU and its instruction sets, the cores,
    TensorFlow's version."""
    from importlib.metadata import version
    return f"machine: {cpu.describe()}, {os.cpu_count()} cores; TensorFlow {version('tensorflow')}"


def run(settings, out=print):
    """Prints every table of the suite in `settings`, one row per subprocess."""
    SETTINGS.update(settings)
    rows = [(t, s) for t, s in suite() if not SETTINGS["only"] or t in SETTINGS["only"]]
    out(f"{machine()}; {time.strftime('%Y-%m-%d')}; suite "
        f"{SETTINGS['suite']}; train: batch {TRAIN['batch']} + {TRAIN['labels']} labelled, "
        f"median of {SETTINGS['windows']} windows of {SETTINGS['steps']} steps, "
        f"{TRAIN['steps_per_execution']} steps per call unless named; IW: S={IW['samples']}, "
        "chunks of 100 samples (exact) or 500 (sampled), "
        f"{SETTINGS['iw_images']} images per call, median of {SETTINGS['repeats']} calls; "
        "a train step with the same settings in two tables is one measurement")
    current, measured = None, {}
    for table, spec in rows:
        spec = {**(IW if table == "iw" else
                   TRAIN if table in ("train", "precision", "optimizer", "versus", "images")
                   else {}),
                **spec}
        if table != current:
            out("\n" + HEADERS[table][0])
            current = table
        # The train, optimizer and precision tables measure the same step: a row with the
        # settings of one measured earlier in this run shows that measurement.
        key = json.dumps([SAME_MEASUREMENT.get(table, table), spec], sort_keys=True)
        if key not in measured:
            measured[key] = run_child(table, spec)
        out(HEADERS[table][1](spec, measured[key]))


if __name__ == "__main__":
    child(sys.argv[1])
