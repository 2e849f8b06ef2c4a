"""Evaluate exported probes: ``python evaluate.py --probes outputs/runs/<run>/probes``."""
from probes.cli.main import evaluate_main

if __name__ == "__main__":
    evaluate_main()
