"""The command-line programs (absl) and what they share.

One module per program: `train` (cagem-train), `evaluate` (cagem-evaluate), `export`
(cagem-export), `sample` (cagem-sample), `classify` (cagem-classify). Each parses flags and
calls the library; the scripts
in train/ and export/ of a checkout and the console scripts of an installed package run them.
"""

import os
import sys

# Before TensorFlow is imported: no C++ start-up lines before --help or an error.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags, logging  # noqa: E402


def define_thread_flags() -> None:
    """--intra_op_threads and --inter_op_threads (unset: the library's choice for this CPU,
    `cpu.default_threads`; 0: TensorFlow's choice)."""
    flags.DEFINE_integer("intra_op_threads", None, "Threads one op (a matmul) may use; 0: "
                         "TensorFlow's default. Unset: 1 on a CPU with 2 cores or fewer (with "
                         "--inter_op_threads 2, the fastest there; docs/performance.md), else "
                         "TensorFlow's default.")
    flags.DEFINE_integer("inter_op_threads", None, "Ops run at once; 0: TensorFlow's default. "
                         "Unset: the number of cores on a CPU with 2 cores or fewer, else "
                         "TensorFlow's default.")


def run(main, module: str) -> None:
    """app.run(main), with the flags of `module` and the shared ones listed by --help (absl
    lists only the key flags of the script that was started)."""
    program = sys.argv[0]
    main_module = sys.modules["__main__"]
    if not main_module.__doc__:  # a console script: --help shows the program's usage
        main_module.__doc__ = sys.modules[module].__doc__
    for name in (module, __name__):
        for flag in flags.FLAGS.get_flags_for_module(name):
            flags.FLAGS.register_key_flag_for_module(program, flag)
    app.run(main)


def rename(old: str, new: str) -> None:
    """Keeps a renamed flag working: --old sets --new, with a one-line deprecation notice."""
    if flags.FLAGS[old].present:
        if flags.FLAGS[new].present:
            sys.exit(f"error: --{old} is the old name of --{new}; give only --{new}")
        print(f"note: --{old} is deprecated; use --{new}", file=sys.stderr)
        flags.FLAGS[new].value = flags.FLAGS[old].value


def start(argv, hint: str = "") -> None:
    """Refuses positional arguments with a one-line error, keeps TensorFlow's INFO logging quiet
    unless --verbosity was given, and applies the thread flags when the program defines them
    (before TensorFlow runs its first op, after which they cannot change)."""
    if len(argv) > 1:
        sys.exit(f"error: unexpected arguments {' '.join(argv[1:])}{hint}")
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    if "intra_op_threads" in flags.FLAGS:
        from cagem_tf import cpu
        intra, inter = cpu.threads(flags.FLAGS.intra_op_threads, flags.FLAGS.inter_op_threads)
        if intra < 0 or inter < 0:
            sys.exit("error: --intra_op_threads and --inter_op_threads must be >= 0 "
                     "(0: TensorFlow's default)")
        import tensorflow as tf
        tf.config.threading.set_intra_op_parallelism_threads(intra)
        tf.config.threading.set_inter_op_parallelism_threads(inter)

