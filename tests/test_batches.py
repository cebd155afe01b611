"""dsum.batches against the system it must agree with: transformers' Trainer counts the optimizer steps of
an epoch-based run (set_initial_training_values, transformers 5.24 trainer.py), and dsum sizes ASHA's max_t
and knows a finished run by the same count."""

import pytest
import torch
from conftest import JOBS
from torch.utils.data import DataLoader
from transformers import Trainer, TrainingArguments

from dsum import config
from dsum.batches import Batches


@pytest.mark.parametrize(
    "rows, micro, accumulation, epochs",
    [(288, 4, 4, 2), (100, 4, 4, 1), (101, 2, 3, 1.5), (7, 4, 8, 3), (64, 8, 1, 0.5)],
    ids=["even", "a partial accumulation", "odd everything", "fewer batches than one step", "half an epoch"],
)
def test_optimizer_steps_are_what_the_trainer_counts(tmp_path, rows, micro, accumulation, epochs):
    args = TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=micro, gradient_accumulation_steps=accumulation,
        num_train_epochs=epochs, report_to=[], use_cpu=True,
    )  # fmt: skip
    trainer = Trainer(model=torch.nn.Linear(1, 1), args=args)
    loader = DataLoader(list(range(rows)), batch_size=micro)
    *_, trainers = trainer.set_initial_training_values(args, loader)
    batches = Batches.of(micro, 1, micro * accumulation)
    assert batches.micro_batches(rows) == len(loader)
    assert batches.optimizer_steps(None, epochs, len(loader)) == trainers
    assert batches.optimizer_steps(17, None, len(loader)) == 17  # max_steps, whatever the data


def test_a_global_batch_is_micro_batches_times_workers_times_accumulation():
    b = Batches.of(micro=2, workers=3, global_size=24)
    assert (b.accumulation, b.per_worker, b.global_size) == (4, 8, 24)
    assert Batches.of(micro=2, workers=3, global_size=None).accumulation == 1
    with pytest.raises(ValueError, match=r"train.global_batch_size \(25\) must be divisible by .* \(6\)"):
        Batches.of(micro=2, workers=3, global_size=25)


def test_a_sweep_sizes_asha_by_the_same_count():
    job = config.load(JOBS / "tiny-dialogsum.yaml", ["train.max_steps=null", "train.epochs=2"])
    b = job.batches
    assert job.optimizer_steps(288) == b.optimizer_steps(None, 2, b.micro_batches(288))
