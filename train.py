"""Train (and test, and export) linear probes: ``python train.py fit --config configs/tiny.yaml``."""
import sys

from probes.cli.errors import guarded
from probes.cli.train import train_main

if __name__ == "__main__":
    guarded(train_main, sys.argv[1:], "train.py")
