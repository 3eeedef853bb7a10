"""What the project's absl command-line programs share."""

import sys

from absl import flags, logging


def start(argv, hint: str = "") -> None:
    """Refuses positional arguments with a one-line error, and keeps TensorFlow's INFO logging
    quiet unless --verbosity was given."""
    if len(argv) > 1:
        sys.exit(f"error: unexpected arguments {' '.join(argv[1:])}{hint}")
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
