"""Export a trained run as a SavedModel: python export/main.py --model_dir RUN.

The program is `cagem_tf.cli.export` (also installed as `cagem-export`); see README.md.
"""

from cagem_tf.cli import export

if __name__ == "__main__":
    export.run()
