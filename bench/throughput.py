"""Speed and memory of the data pipeline, the CaGeM train step and the IW bound; prints Markdown.

python bench/throughput.py [--suite full|quick]
                           [--only pipeline,matmul,train,optimizer,precision,images,versus,iw]
                           [--dataset mnist|PATH] [--steps 15] [--windows 5] [--iw_images 4]

The measurements are `cagem_tf.benchmark.throughput`; docs/performance.md holds the numbers.
"""

import sys

from absl import app, flags

from cagem_tf.benchmark import throughput

flags.DEFINE_enum("suite", "full", ["full", "quick"], "full: every row of docs/performance.md; "
                  "quick: a smoke run of each table at toy size (nine processes).")
flags.DEFINE_list("only", [], f"Tables to run ({', '.join(throughput.HEADERS)}); default all.")
flags.DEFINE_string("dataset", None, "Data for the pipeline measurement (a data.load name or "
                    "path); default: random MNIST-shaped arrays.")
flags.DEFINE_string("manual_dir", None, "tfds manual_dir for --dataset.")
flags.DEFINE_string("data_dir", None, "tfds data_dir for --dataset.")
flags.DEFINE_integer("steps", 15, "Train steps per timed window.")
flags.DEFINE_integer("windows", 5, "Timed windows per train row; the median is reported.")
flags.DEFINE_integer("iw_images", 4, "Test images per call of the IW bound (default rows).")
flags.DEFINE_integer("repeats", 3, "Timed calls of the IW bound per row (median).")
FLAGS = flags.FLAGS


def main(argv):
    if len(argv) > 1:
        sys.exit(f"error: unexpected arguments {' '.join(argv[1:])}")
    unknown = [t for t in FLAGS.only if t not in throughput.HEADERS]
    if unknown:
        sys.exit(f"error: --only {','.join(unknown)}: no such table; the tables are "
                 f"{', '.join(throughput.HEADERS)}")
    settings = {k: FLAGS[k].value for k in throughput.SETTINGS}
    try:
        throughput.run(settings, out=lambda line: print(line, flush=True))
    except RuntimeError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    app.run(main)
