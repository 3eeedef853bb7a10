"""Evaluate a trained run: python train/evaluate.py --model_dir RUN [--iw_samples 1,10,5000].

The program is `cagem_tf.cli.evaluate` (also installed as `cagem-evaluate`); see README.md.
"""

from cagem_tf.cli import evaluate

if __name__ == "__main__":
    evaluate.run()
