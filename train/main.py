"""Train CaGeM: python train/main.py --dataset mnist --labels 20 [--flagfile experiments/...].

The program is `cagem_tf.cli.train` (also installed as `cagem-train`); see README.md.
"""

from cagem_tf.cli import train

if __name__ == "__main__":
    train.run()
