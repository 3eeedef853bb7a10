"""Samples of a SavedModel as a PNG grid: python export/sample.py --saved_model RUN/export/1.

The program is `cagem_tf.cli.sample` (also installed as `cagem-sample`); see README.md.
"""

from cagem_tf.cli import sample

if __name__ == "__main__":
    sample.run()
