"""The one progress bar: tqdm with the project's settings (resizes with the terminal, off on request)."""
from __future__ import annotations

from typing import Any

from tqdm.auto import tqdm


def progress_bar(total: int | None = None, desc: str = "", unit: str = "it", enabled: bool = True,
                 **kwargs: Any) -> tqdm:
    """A bar over ``total`` ``unit``s; ``enabled=False`` gives a silent one (same calls, no output)."""
    return tqdm(total=total, desc=desc, unit=unit, disable=not enabled, dynamic_ncols=True, **kwargs)
