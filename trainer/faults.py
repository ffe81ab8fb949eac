"""Fault injection for the reliability tests: the faults a trainer is told to commit, passed in.

Nothing here reads the environment: ``hisam trainer run`` builds its ``Faults`` from
``HISAM_FAULT_CORRUPT_AFTER_PUBLISHES``, ``HISAM_FAULT_CORRUPT`` and
``HISAM_FAULT_EXIT_IN_PUBLISH`` (hisam/jobs/trainer_run.py), which is how a test arms a fault
in the trainer it runs as a child process. None is armed by default.

- ``corrupt_after_publishes=N``: right after its N-th publish the trainer corrupts its
  candidate (``corrupt``): ``scramble`` permutes and sign-flips every weight tensor (finite
  but wrong), ``nan`` fills them with NaN. The gate must refuse what follows.
- ``exit_in_publish``: the process exits abruptly (``os._exit``, as SIGKILL would leave it)
  at that step of a publish or a rollback: serving/repository.py's ``FaultPoint`` (the
  renames of a publish, the moves of a hide), or the trainer's own ``TrainerFaultPoint``:
  ``weights_saved`` (the version's weights saved in the state, nothing published yet).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Literal, get_args

import torch

from models.hmat.model import HMAT
from serving.repository import FaultPoint

log = logging.getLogger(__name__)

Corruption = Literal["scramble", "nan"]
TrainerFaultPoint = Literal["weights_saved"]
FAULT_POINTS = (*get_args(FaultPoint), *get_args(TrainerFaultPoint))


@dataclass(frozen=True)
class Faults:
    """The faults armed in one trainer process (module docstring)."""

    corrupt_after_publishes: int | None = None
    corrupt: Corruption = "scramble"
    exit_in_publish: FaultPoint | TrainerFaultPoint | None = None

    def __post_init__(self) -> None:
        if self.corrupt not in get_args(Corruption):
            raise ValueError(f"corrupt must be one of {get_args(Corruption)}, got {self.corrupt!r}")
        if self.exit_in_publish is not None and self.exit_in_publish not in FAULT_POINTS:
            raise ValueError(f"exit_in_publish must be one of {FAULT_POINTS}, got {self.exit_in_publish!r}")

    def exit_at(self, point: TrainerFaultPoint) -> None:
        """Exit abruptly here when ``point`` is the armed one (module docstring)."""
        if self.exit_in_publish == point:
            log.critical("fault injection: exiting in the middle of a publish (%s)", point)
            logging.shutdown()
            os._exit(137)


def corrupt(model: HMAT, how: Corruption) -> None:
    """Corrupt ``model``'s weights in place (module docstring); deterministic."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if how == "nan":
                p.fill_(float("nan"))
            elif p.dim():
                p.copy_(-p[torch.randperm(p.shape[0], generator=g)])
    log.warning("fault injection: candidate weights corrupted (%s)", how)
