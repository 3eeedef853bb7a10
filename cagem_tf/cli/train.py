"""cagem-train (train/main.py): train CaGeM, e.g. --dataset mnist --labels 20 [--flagfile F].

Every flag is a field of `cagem_tf.config.Config`; rerunning the same command resumes the run in
--model_dir.
"""

import sys

from absl import flags

from cagem_tf import cli
from cagem_tf.config import Config
from cagem_tf.files import UserError

for _name, _type, _default, _help, _choices in Config.fields():
    if _choices:
        flags.DEFINE_enum(_name, _default, list(_choices), _help)
    elif _type is bool:
        flags.DEFINE_bool(_name, _default, _help)
    elif _type is int:
        flags.DEFINE_integer(_name, _default, _help)
    elif _type is float:
        flags.DEFINE_float(_name, _default, _help)
    elif _type == list[int]:
        flags.DEFINE_list(_name, [str(w) for w in _default], _help)
    else:
        flags.DEFINE_string(_name, _default, _help)
cli.define_thread_flags()
FLAGS = flags.FLAGS


def config_from_flags() -> Config:
    return Config(**{name: FLAGS[name].value for name, *_ in Config.fields()})


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
