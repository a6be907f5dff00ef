"""Progress events yielded by the compute core's generators.

A GUI turns them into a progress bar and may stop iterating between tiles to cancel; a script ignores them.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Progress:
    """One step of a running prediction.

    ``stage`` is one of ``"load"``, ``"preprocess"``, ``"predict"``, ``"export"``, ``"done"``.
    During ``"predict"``, ``tile`` counts from 1 to ``n_tiles`` within fold ``fold`` (1..``n_folds``);
    ``step``/``n_steps`` count tiles over all folds, which is what a progress bar wants.
    """

    stage: str
    message: str = ""
    tile: int = 0
    n_tiles: int = 0
    fold: int = 0
    n_folds: int = 0
    step: int = 0
    n_steps: int = 0
    seconds: float = 0.0
