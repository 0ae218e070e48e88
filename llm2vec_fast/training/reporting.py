"""Where a run's metrics go besides ``log.jsonl``: Hugging Face's ``report_to`` integrations.

``report_to`` takes Hugging Face's values:
- ``None`` or ``"none"``: log.jsonl only;
- ``"all"``: every integration whose package is installed;
- a name or a list of names from :data:`INTEGRATIONS`.

A named integration that is not installed is refused when the config is checked, before any model loads.

- **TensorBoard**: event files under ``logging_dir`` (default ``<output_dir>/runs``), through
  ``torch.utils.tensorboard``.
- **Weights & Biases**: one run named ``run_name``, in the project ``$WANDB_PROJECT`` (default
  "llm2vec-fast"), with the config as the run's config. ``WANDB_MODE=offline`` keeps it off the network.

Scalars are named as the Hugging Face Trainer names them: ``train/loss``, ``train/learning_rate``, ... and
``eval/loss``, ``eval/accuracy``, ... for a record's ``eval_*`` keys. Only rank 0 reports.
"""
from __future__ import annotations

import importlib.util
import os
from typing import Dict, List, Optional, Sequence, Union

# integration -> the package it needs
INTEGRATIONS = {"tensorboard": "tensorboard", "wandb": "wandb"}
# log.jsonl's keys -> Hugging Face's scalar names (others keep their own)
_RENAMED = {"lr": "learning_rate"}


def installed(name: str) -> bool:
    return importlib.util.find_spec(INTEGRATIONS[name]) is not None


def resolve_report_to(value: Union[None, str, Sequence[str]]) -> List[str]:
    """The integrations ``report_to`` asks for, in order; ValueError for an unknown or uninstalled one."""
    names = [value] if isinstance(value, str) else list(value or [])
    if names in ([], ["none"]):
        return []
    if names == ["all"]:
        return [name for name in INTEGRATIONS if installed(name)]
    chosen: List[str] = []
    for name in names:
        if name not in INTEGRATIONS:
            raise ValueError(f"config key 'report_to' takes 'none', 'all' or names from {sorted(INTEGRATIONS)}, "
                             f"got {name!r}")
        if not installed(name):
            package = INTEGRATIONS[name]
            raise ValueError(f"config key 'report_to' names {name!r}, which needs the {package} package: "
                             f"pip install {package} (or leave {name!r} out)")
        if name not in chosen:
            chosen.append(name)
    return chosen


def scalar_name(key: str) -> str:
    """``eval_loss`` -> ``eval/loss``; ``lr`` -> ``train/learning_rate``; ``loss`` -> ``train/loss``."""
    if key.startswith("eval_"):
        return "eval/" + key[len("eval_"):]
    return "train/" + _RENAMED.get(key, key)


class Reporters:
    """The run's open integrations: :meth:`log` each record, :meth:`close` at the end."""

    def __init__(self, names: Sequence[str], *, output_dir: str, logging_dir: Optional[str] = None,
                 run_name: Optional[str] = None, config: Optional[Dict] = None):
        self._writer = None
        self._wandb = None
        if "tensorboard" in names:
            from torch.utils.tensorboard import SummaryWriter
            self._writer = SummaryWriter(log_dir=logging_dir or os.path.join(output_dir, "runs"))
        if "wandb" in names:
            import wandb
            self._wandb = wandb
            wandb.init(project=os.environ.get("WANDB_PROJECT", "llm2vec-fast"), name=run_name, config=config,
                       dir=output_dir)

    def log(self, record: Dict) -> None:
        """One log.jsonl record (its ``step`` and numeric values)."""
        step = record["step"]
        scalars = {scalar_name(key): float(value) for key, value in record.items()
                   if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool)}
        if self._writer is not None:
            for name, value in scalars.items():
                self._writer.add_scalar(name, value, step)
        if self._wandb is not None:
            self._wandb.log(scalars, step=step)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None
