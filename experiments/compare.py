"""Train and evaluate a set of flagfiles, then write one comparison table.

python experiments/compare.py --flagfiles experiments/cpu_cagem100.flags,experiments/cpu_vae.flags
    --out runs/cpu_protocol [--eval_iw_samples 1,10,1000] [--eval_subset 1000] [-- extra train flags]

Each flagfile trains into OUT/<its name> (an existing run resumes), is evaluated with
train/evaluate.py, and OUT/comparison.md gets one row per run (and OUT/likelihood_vs_labels.png
the bounds against the number of labels). Wall times are recorded per run.
"""

import json
import os
import subprocess
import sys
import time

from absl import app, flags

from cagem_tf import cli, figures, files, report

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

flags.DEFINE_list("flagfiles", None, "Flagfiles of train/main.py, one run each.")
flags.DEFINE_string("out", None, "Directory of the runs and of comparison.md.")
flags.DEFINE_list("eval_iw_samples", ["1", "10", "1000"], "Bounds F_S to evaluate.")
flags.DEFINE_integer("eval_subset", 1000, "Test images evaluated (the first ones; 0: all).")
flags.DEFINE_string("baseline", None, "Name of the run (a flagfile's name) that every run is "
                    "compared with, paired per image, at the largest S.")
flags.DEFINE_list("iw_samples", None, "Deprecated name of --eval_iw_samples.")
flags.DEFINE_integer("subset", None, "Deprecated name of --eval_subset.")
flags.mark_flags_as_required(["flagfiles", "out"])
FLAGS = flags.FLAGS


def run(args, log_path):
    """Runs a command, its output appended to log_path; exits with the log's tail on failure."""
    with open(log_path, "a") as log:
        result = subprocess.run(args, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    if result.returncode:
        with open(log_path) as log:
            tail = log.read()[-1500:]
        sys.exit(f"error: {' '.join(args[1:3])} failed (see {log_path}):\n{tail}")


def main(argv):
    extra = argv[1:]
    missing = [f for f in FLAGS.flagfiles if not os.path.isfile(f)]
    if missing:
        sys.exit(f"error: no such flagfile: {', '.join(missing)}")
    cli.rename("iw_samples", "eval_iw_samples")
    cli.rename("subset", "eval_subset")
    samples = [str(int(s)) for s in FLAGS.eval_iw_samples]
    names = [os.path.splitext(os.path.basename(f))[0] for f in FLAGS.flagfiles]
    run_dirs = {name: os.path.join(FLAGS.out, name) for name in names}
    if FLAGS.baseline and FLAGS.baseline not in run_dirs:
        sys.exit(f"error: --baseline {FLAGS.baseline}: not one of the runs "
                 f"({', '.join(run_dirs)}); give a flagfile's name without .flags")
    os.makedirs(FLAGS.out, exist_ok=True)
    rows = []
    for flagfile, (name, run_dir) in zip(FLAGS.flagfiles, run_dirs.items()):
        log_path = os.path.join(FLAGS.out, f"{name}.log")
        start = time.time()
        run([sys.executable, "train/main.py", f"--flagfile={os.path.abspath(flagfile)}",
             f"--model_dir={os.path.abspath(run_dir)}", *extra], log_path)
        trained = time.time()
        run([sys.executable, "train/evaluate.py", f"--model_dir={os.path.abspath(run_dir)}",
             f"--eval_iw_samples={','.join(samples)}", f"--eval_subset={FLAGS.eval_subset}"],
            log_path)
        with open(os.path.join(run_dir, "evaluation", "results.json")) as f:
            result = json.load(f)
        result.update(train_seconds=trained - start, eval_seconds=time.time() - trained)
        rows.append((name, result))
        print(f"{name}: done", flush=True)
    table = report.comparison_table(rows, samples)
    if FLAGS.baseline:
        table += "\n" + report.paired_table(run_dirs, FLAGS.baseline, int(max(samples, key=int)))
    files.write_file(os.path.join(FLAGS.out, "comparison.md"), lambda f: f.write(table))
    figures.likelihood_vs_labels(
        [(r["labels"], {s: r["bounds"][s]["mean"] for s in samples}) for _, r in rows],
        os.path.join(FLAGS.out, "likelihood_vs_labels.png"))
    print(table)


if __name__ == "__main__":
    app.run(main)
