"""Evaluate exported probes: ``python evaluate.py --probes outputs/runs/<run>/probes``."""
from probes.evaluation import main

if __name__ == "__main__":
    main()
