"""Train (and test, and export) linear probes: ``python train.py fit --config configs/tiny.yaml``."""
from probes.cli.train import train_main

if __name__ == "__main__":
    train_main()
