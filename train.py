"""Train (and test, and export) linear probes: ``python train.py fit --config configs/tiny.yaml``."""
from data.datamodule import ActivationDataModule
from probes.cli import ProbeCLI
from probes.module import ProbeModule


def main() -> None:
    ProbeCLI(ProbeModule, ActivationDataModule, subclass_mode_model=True)


if __name__ == "__main__":
    main()
