"""cagem-train (train/main.py): train CaGeM, e.g. --dataset mnist --labels 20 [--flagfile F].

Every flag is a field of `cagem_tf.config.Config`; rerunning the same command resumes the run in
--model_dir.
"""

import sys

from absl import flags

from cagem_tf import cli
from cagem_tf.config import Config
from cagem_tf.files import UserError


def define_flags(values: flags.FlagValues = flags.FLAGS) -> None:
    """One flag per field of `Config`, in `values`."""
    for name, kind, default, help_text, choices in Config.fields():
        if choices:
            flags.DEFINE_enum(name, default, list(choices), help_text, flag_values=values)
        elif kind is bool:
            flags.DEFINE_bool(name, default, help_text, flag_values=values)
        elif kind is int:
            flags.DEFINE_integer(name, default, help_text, flag_values=values)
        elif kind is float:
            flags.DEFINE_float(name, default, help_text, flag_values=values)
        elif kind == list[int]:
            flags.DEFINE_list(name, [str(w) for w in default], help_text, flag_values=values)
        else:
            flags.DEFINE_string(name, default, help_text, flag_values=values)


def config_from_flags(values: flags.FlagValues = flags.FLAGS) -> Config:
    """The `Config` of parsed flags (`define_flags`)."""
    return Config(**{name: values[name].value for name, *_ in Config.fields()})


define_flags()
cli.define_thread_flags()
FLAGS = flags.FLAGS


def main(argv):
    cli.start(argv, "; flags look like --labels 20")
    from cagem_tf import training
    try:
        training.train(config_from_flags())
    except UserError as e:
        sys.exit(f"error: {e}")


def run():
    cli.run(main, __name__)


if __name__ == "__main__":
    run()
