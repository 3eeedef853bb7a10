"""Score your own images with an exported model: python export/classify.py --saved_model
RUN/export/1 --images DIR --out scores.csv.

The program is `cagem_tf.cli.classify` (also installed as `cagem-classify`); see README.md.
"""

from cagem_tf.cli import classify

if __name__ == "__main__":
    classify.run()
