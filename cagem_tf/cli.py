"""What the project's absl command-line programs share."""

import sys

from absl import flags, logging


def define_thread_flags() -> None:
    """--intra_op_threads and --inter_op_threads (0: TensorFlow's choice)."""
    flags.DEFINE_integer("intra_op_threads", 0, "Threads one op (a matmul) may use; 0: "
                         "TensorFlow's default. On 2 cores, 1 with --inter_op_threads 2 was "
                         "fastest (docs/performance.md).")
    flags.DEFINE_integer("inter_op_threads", 0, "Ops run at once; 0: TensorFlow's default.")


def start(argv, hint: str = "") -> None:
    """Refuses positional arguments with a one-line error, keeps TensorFlow's INFO logging quiet
    unless --verbosity was given, and applies the thread flags when the program defines them
    (before TensorFlow runs its first op, after which they cannot change)."""
    if len(argv) > 1:
        sys.exit(f"error: unexpected arguments {' '.join(argv[1:])}{hint}")
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    if "intra_op_threads" in flags.FLAGS:
        intra, inter = flags.FLAGS.intra_op_threads, flags.FLAGS.inter_op_threads
        if intra < 0 or inter < 0:
            sys.exit("error: --intra_op_threads and --inter_op_threads must be >= 0 "
                     "(0: TensorFlow's default)")
        import tensorflow as tf
        tf.config.threading.set_intra_op_parallelism_threads(intra)
        tf.config.threading.set_inter_op_parallelism_threads(inter)
