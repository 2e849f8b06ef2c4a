"""The one CSV writer: long-form rows (``metrics.csv``, ``per_image.csv``, prompt sets) in a fixed column order."""
from __future__ import annotations

import csv
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from probes.common.files import atomic_write


def write_csv(rows: Iterable[Mapping[str, Any]], columns: Sequence[str], path: str | os.PathLike,
              ignore_extra: bool = True) -> Path:
    """Write ``rows`` under a header of ``columns`` (UTF-8, the folder created if needed), atomically
    (:func:`probes.common.files.atomic_write`: a kill mid-write leaves the previous file whole).

    :param ignore_extra: drop keys that are not columns (rows often carry more than a file shows);
        ``False`` refuses them.
    """
    path = Path(path)
    with atomic_write(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(columns), extrasaction="ignore" if ignore_extra else "raise")
        w.writeheader()
        w.writerows(rows)
    return path
