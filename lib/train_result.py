"""What training reports: a step's progress while it runs (to `on_log`) and the TrainResult at the end.

Its own module because both sides of a data-parallel run build them: lib/training.py in the ranks and
lib/launch.py in the task process that relays them (neither imports the other's loop).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field


@dataclass
class Progress:
    step: int  # optimizer steps done, counting those of a run this one resumed
    total: int
    eta_seconds: float  # at this process's rate so far


# on_log(step, metrics, progress): metrics go to MLflow as they are; progress is None for the final validation.
LogFn = Callable[[int, dict[str, float], Progress | None], None]


@dataclass
class TrainResult:
    adapter_dir: str
    steps: int
    tokens: int  # real (non-padding) tokens trained on
    seconds: float
    final_loss: float
    validation_loss: float | None
    history: list[dict] = field(default_factory=list)  # every step, including those before a resume
    resumed_from_step: int | None = None
    lora_targets: list[str] = field(default_factory=list)  # module names the adapter was put on (lib/lora.py)

    def summary(self) -> dict:
        """Everything but the per-step history: what a run summary shows."""
        return {k: v for k, v in asdict(self).items() if k != "history"}
