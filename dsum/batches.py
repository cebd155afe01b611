"""Batch and step arithmetic, in one place: how a job's micro batch, workers and global batch make its
gradient accumulation, and how many optimizer steps a run takes. The config validates with it, the planner
and the memory recommendation report with it, a sweep sizes ASHA's max_t with it and the training loop
knows when a resumed run is already finished with it."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Batches:
    micro: int  # examples per worker per forward pass
    workers: int
    accumulation: int  # micro batches per optimizer step, on each worker

    @classmethod
    def of(cls, micro: int, workers: int, global_size: int | None) -> Batches:
        """The accumulation that makes `global_size` (None: one micro batch per worker per step). A global
        batch the workers' micro batches don't divide is a ValueError naming the fields."""
        per_step = micro * workers
        if global_size is not None and global_size % per_step:
            raise ValueError(
                f"train.global_batch_size ({global_size}) must be divisible by "
                f"scaling.num_workers × train.micro_batch_size ({per_step})"
            )
        return cls(micro, workers, (global_size or per_step) // per_step)

    @property
    def per_worker(self) -> int:
        """Examples each worker contributes to one optimizer step."""
        return self.micro * self.accumulation

    @property
    def global_size(self) -> int:
        """Examples in one optimizer step, over all workers."""
        return self.per_worker * self.workers

    def micro_batches(self, rows: int) -> int:
        """Micro batches one worker loads in an epoch of `rows` examples (the sampler pads the last to the
        workers; packing can only make it fewer)."""
        return math.ceil(rows / (self.micro * self.workers))

    def optimizer_steps(self, max_steps: int | None, epochs: float, micro_batches: int) -> int:
        """The optimizer steps a run takes: max_steps, or as transformers' Trainer counts epochs (5.24,
        trainer.py set_initial_training_values): a partial accumulation at an epoch's end is a step too."""
        if max_steps:
            return max_steps
        per_epoch = max(math.ceil(micro_batches / self.accumulation), 1)
        return math.ceil(epochs * per_epoch)
