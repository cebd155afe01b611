"""Step metrics on their way from rank 0 to the tracking store: the types the layers agree on. The core's
training loop hands metrics to a StepSink; the tracking layer says where they go (a StepTarget the worker
opens, or OnDriver: a sink in the driver's process); the Ray layer carries the target to the workers, and
relays OnDriver's metrics back."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

# Keys of the reports rank 0 makes to Ray, which the Ray layer (a sweep's scheduler, its trial outcomes) reads
STEP = "step"  # the optimizer step, in every report: the Trainer's logs at an evaluation, and the final one
FINAL_KEY = "global_step"  # a TrainResult field: only the final report (training over) carries it


class StepSink(Protocol):
    """Where rank 0's step metrics go: called with (step, metrics) as they are logged, closed at the end."""

    def __call__(self, step: int, metrics: dict[str, float]) -> None: ...

    def close(self) -> None: ...


class StepTarget(Protocol):
    """A step-metrics sink as it crosses to the workers (picklable): rank 0 opens it."""

    def open(self) -> StepSink: ...


@dataclass(frozen=True)
class OnDriver:
    """Step metrics for `log` in the driver's own process (a store only it can reach, e.g. a local sqlite
    file): the layer that runs the workers relays them there, and opens no sink on a worker."""

    log: Callable[[int, dict[str, float]], None]
