"""ASHA with promotions (`tune.scheduler: asha-promote`): the asynchronous successive halving of Li et al.
(2020), Algorithm 2, on Ray Tune's trial scheduler interface.

Ray's ASHAScheduler decides when a trial reaches a rung: it goes on if it is in the top 1/reduction_factor
of the results that rung has so far. The first trials to reach a rung have nothing before them, and go on;
in a sweep of a few trials on a few workers that is much of the sweep. Here a trial that reaches a rung
pauses (its training stopped; its checkpoint stays in the storage path) unless it is already among the
best floor(n / reduction_factor) of the n results of that rung; a freed worker first resumes a paused
trial that has become promotable, else starts a trial that has not run yet. Once no more trials can reach
a rung (every trial is past it, stopped, or paused below it with no promotion left), its best
max(1, floor(n / reduction_factor)) go on and the rest stop there.

The cost: a promoted trial starts again from its checkpoint (its model load, its Trainer; in a process Tune
kept where its trials train in their own actors, else a new Train run's workers). The
gain: no trial trains past a rung without beating the others that reached it. The scheduler also holds
the sweep to `limit` trials at once (a trial waiting its turn is kept PAUSED until a worker is free), since
paused trials count as live for Tune's searchers and a searcher's own limit would stall the sweep. With
`ahead`, that many more are let through once the `limit` before them run: they wait, staged, for a running
trial's resources (a trial that holds its resources in its own Tune actor: Tune then hands it the process
a stopped or paused trial leaves, dsum.cluster.tune).

A restored sweep (its driver killed) gets back the rungs, promotions and the rung each trial reached as they
were when Tune last saved the sweep (`save` / `restore`, called by dsum's sweep callback: Tune saves no
scheduler's state itself); a restored trial that was paused at a rung without a promotion pauses again.
"""

from __future__ import annotations

import pickle
from typing import Any

from ray.tune.experiment import Trial
from ray.tune.schedulers import FIFOScheduler, TrialScheduler

_RUN = (Trial.PENDING, Trial.RUNNING)


class PromotingASHA(FIFOScheduler):
    def __init__(
        self,
        time_attr: str,
        metric: str,
        mode: str,
        max_t: int,
        grace_period: int,
        reduction_factor: float,
        limit: int,
        ahead: int = 0,
    ):
        super().__init__()
        self._time_attr, self._metric, self._sign = time_attr, metric, 1.0 if mode == "max" else -1.0
        self._max_t, self._rf, self._limit, self._ahead = max_t, reduction_factor, max(1, limit), ahead
        self.milestones: list[float] = []  # grace_period × reduction_factor^k (not rounded: no rung twice)
        t = grace_period
        while t < max_t:
            self.milestones.append(t)
            t *= reduction_factor
        self.rungs: list[dict[str, float]] = [{} for _ in self.milestones]  # trial id → score (higher is better)
        self.promoted: list[set[str]] = [set() for _ in self.milestones]
        self.reached: dict[str, int] = {}  # trial id → the highest rung it recorded

    def set_search_properties(self, metric, mode, **spec) -> bool:
        return True  # metric and mode come from the job

    # --- which rungs are decided -------------------------------------------------------------------------

    def _top(self, k: int, closed: bool) -> list[str]:
        scores = self.rungs[k]
        n = int(len(scores) // self._rf)
        if closed:
            n = max(1, n)
        return sorted(scores, key=lambda tid: scores[tid], reverse=True)[:n]

    def _closed(self, controller) -> list[bool]:
        """closed[k]: no trial can still reach rung k, so its promotions are final. Rung 0 closes when the
        searcher has no more trials and every live trial has recorded it; rung k when rung k-1 is closed and
        each trial promoted from it has recorded rung k, or ended."""
        live = [t for t in controller.get_trials() if t.status not in (Trial.TERMINATED, Trial.ERROR)]
        closed, before = [], controller.search_alg.is_finished()
        for k in range(len(self.milestones)):
            if k == 0:
                before = before and all(self.reached.get(t.trial_id, -1) >= 0 for t in live)
            else:
                top = set(self._top(k - 1, True))
                waiting = self.promoted[k - 1] | top
                before = before and all(self.reached.get(t.trial_id, -1) >= k for t in live if t.trial_id in waiting)
            closed.append(before)
        return closed

    # --- Tune's hooks -----------------------------------------------------------------------------------

    def on_trial_add(self, controller, trial: Trial) -> None:
        """A new trial (or one a restored sweep brings back) waits its turn, paused, when the sweep is full; a
        restored one that had paused at a rung without a promotion pauses there again. A finished one stays."""
        if trial.status not in _RUN:
            return
        k = self.reached.get(trial.trial_id, -1)
        waiting = k >= 0 and trial.trial_id not in self.promoted[k]
        others = [t for t in controller.get_trials() if t is not trial and t.status in _RUN]
        if waiting or len(others) >= self._limit:
            trial.set_status(Trial.PAUSED)  # before Tune files the trial under its status

    def on_trial_result(self, controller, trial: Trial, result: dict[str, Any]) -> str:
        step, value = result.get(self._time_attr), result.get(self._metric)
        if step is None or value is None or step >= self._max_t:
            return TrialScheduler.CONTINUE
        tid, passed = trial.trial_id, self.reached.get(trial.trial_id, -1)
        k = passed
        while k + 1 < len(self.milestones) and step >= self.milestones[k + 1]:
            k += 1
            self.rungs[k][tid] = self._sign * float(value)
        if k == passed:  # between rungs
            return TrialScheduler.CONTINUE
        self.reached[tid] = k
        if tid in self._top(k, self._closed(controller)[k]):
            self.promoted[k].add(tid)
            return TrialScheduler.CONTINUE
        return TrialScheduler.PAUSE

    def choose_trial_to_run(self, controller) -> Trial | None:
        trials = controller.get_trials()
        closed = self._closed(controller)
        paused = {t.trial_id: t for t in trials if t.status == Trial.PAUSED}
        for k, done in enumerate(closed):  # the paused trials a closed rung did not promote stop there
            if done:
                top = set(self._top(k, True))
                for tid, t in list(paused.items()):
                    if self.reached.get(tid) == k and tid not in top:
                        controller.stop_trial(t)
                        del paused[tid]
        live = [t for t in trials if t.status in _RUN]
        if len(live) >= self._limit + self._ahead:
            return None
        if len(live) >= self._limit and any(t.status == Trial.PENDING for t in live):
            return None  # (one ahead is staged once those before it run: trials start in their order)
        for k in reversed(range(len(self.milestones))):  # promotions first, from the highest rung
            for tid in self._top(k, closed[k]):
                if tid in paused and self.reached.get(tid) == k and tid not in self.promoted[k]:
                    self.promoted[k].add(tid)
                    return paused[tid]
        for t in trials:  # then a trial that has not reached a rung yet (waiting its turn)
            if t.status == Trial.PAUSED and self.reached.get(t.trial_id, -1) < 0:
                return t
        return None

    _STATE = ("rungs", "promoted", "reached")

    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "wb") as f:
            pickle.dump({name: getattr(self, name) for name in self._STATE}, f)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as f:
            state = pickle.load(f)
        for name in self._STATE:
            setattr(self, name, state[name])

    def debug_string(self) -> str:
        counts = ", ".join(f"{m}: {len(r)}" for m, r in zip(self.milestones, self.rungs, strict=True))
        return f"ASHA with promotions (reduction factor {self._rf}); results at each rung: {counts}"
