"""W&B logging that never hangs: offline automatically when no API key is configured.

On a cluster node without credentials, ``wandb.init`` would prompt for a key (and block a batch
job). This logger decides up front: with a key (``WANDB_API_KEY`` or a ``~/.netrc`` entry for
api.wandb.ai) it logs online; without one it logs offline into the run folder, to be uploaded
later with ``wandb sync <run>/wandb/offline-run-*``. ``WANDB_MODE=disabled`` still wins.
"""
from __future__ import annotations

import netrc
import os
from pathlib import Path
from typing import Any

from pytorch_lightning.loggers import WandbLogger as _WandbLogger


def wandb_api_key_available() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        auth = netrc.netrc(os.environ.get("NETRC") or os.path.expanduser("~/.netrc"))
        return any(host.endswith("wandb.ai") for host in auth.hosts)
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def start_wandb_run(project: str, save_dir: str | Path, name: str | None = None, group: str | None = None,
                    job_type: str | None = None, config: dict[str, Any] | None = None):
    """A W&B run for a command that is not a Lightning fit (the intervention, the lens), with the
    logger's rule: online with credentials, offline into ``save_dir`` without (``WANDB_MODE`` wins)."""
    import wandb

    mode = os.environ.get("WANDB_MODE") or ("online" if wandb_api_key_available() else "offline")
    os.environ.setdefault("WANDB_SILENT", "true")
    os.makedirs(save_dir, exist_ok=True)
    return wandb.init(project=project, dir=str(save_dir), mode=mode, name=name, group=group, job_type=job_type,
                      config=config)


class WandbLogger(_WandbLogger):
    """Lightning's ``WandbLogger``, with ``offline=None`` meaning "offline unless a key is set".

    :param offline: ``True``/``False`` force the mode; ``None`` decides from the credentials.
    Other arguments are those of ``pytorch_lightning.loggers.WandbLogger``.
    """

    def __init__(self, project: str = "diffusion-probes", save_dir: str = ".", offline: bool | None = None,
                 **kwargs: Any) -> None:
        if offline is None:
            offline = os.environ.get("WANDB_MODE") == "offline" or not wandb_api_key_available()
        if offline:
            os.environ.setdefault("WANDB_MODE", "offline")
        os.environ.setdefault("WANDB_SILENT", "true")
        os.makedirs(save_dir, exist_ok=True)
        super().__init__(project=project, save_dir=save_dir, offline=offline, **kwargs)
        if self._wandb_init.get("anonymous") is None:
            # Lightning passes anonymous=None, which recent wandb answers with "The anonymous setting has
            # no effect" on every run: leave the setting out instead
            self._wandb_init.pop("anonymous", None)
        self.is_offline = offline

    def log_results(self, rows: list[dict], best: list[dict], written: dict[str, Any],
                    panels: dict[str, dict[str, Any]] | None = None, per_image: Any = None) -> None:
        """Final results: tables, custom charts, plots, prediction panels, the knowledge beyond position
        (with bootstrap intervals) and the probe artifact."""
        import wandb

        from probes.reporting import wandb_tables as wandb_report

        run = self.experiment
        payload: dict[str, Any] = {"results/metrics": wandb_report.metrics_table(rows)}
        if best:
            # timesteps to one decimal as everywhere people read them (metrics.csv keeps full precision)
            payload["results/best"] = wandb.Table(columns=list(best[0]), data=[
                [round(v, 1) if k == "timestep" else v for k, v in b.items()] for b in best])
        payload.update(wandb_report.charts(rows))
        beyond = wandb_report.beyond_position_table(rows, per_image)
        if beyond is not None:
            payload["results/beyond_position"] = beyond
        for path in written.get("plots", []):
            payload[f"plots/{Path(path).stem}"] = wandb.Image(str(path))
        for task, panel in (panels or {}).items():
            payload[f"panels/{task}"] = wandb_report.panel_table(task, panel)
            if task in written.get("panels", {}):
                payload[f"panels/{task}_grid"] = wandb.Image(str(written["panels"][task]))
        run.log(payload)
        if written.get("probes"):
            art = wandb_report.probe_artifact(Path(written["probes"]), name=f"probes-{run.id}")
            run.log_artifact(art, aliases=["latest"])
            self.logged_artifact = art
