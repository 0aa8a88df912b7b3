"""The trial's side of a sweep, inside train.py: each epoch's monitored value goes to Optuna, which may prune.

sweep.py starts each trial as an ordinary `train.py` run and says which trial it is in TORCHKILN_TRIAL (JSON:
storage URL, study name, trial number, pruner); the URL stays off the command line, where `ps` would show a
database password. Without the variable nothing here runs.
"""

import json
import os

from utils import distributed

ENVIRONMENT = "TORCHKILN_TRIAL"


class TrialReporter:
    """Called by the Monitor after each epoch: reports the value (rank 0), and returns why to stop when the
    pruner says so, the same answer on every rank."""

    def __init__(self, storage: str, study: str, number: int, pruner: list, epochs: int):
        from .study import make_pruner, storage_for

        self.trial, self.epochs = None, epochs
        if distributed.is_main():
            import optuna

            self.storage = storage_for(storage)
            study_id = self.storage.get_study_id_from_name(study)
            self.trial_id = self.storage.get_trial_id_from_study_id_trial_number(study_id, number)
            loaded = optuna.load_study(study_name=study, storage=self.storage, pruner=make_pruner(pruner))
            self.trial = optuna.trial.Trial(loaded, self.trial_id)
        self.pruner = pruner[0]

    def __call__(self, epoch: int, value: float, best: float, best_epoch: int | None) -> str | None:
        reason = None
        if self.trial is not None:
            if epoch not in self.storage.get_trial(self.trial_id).intermediate_values:  # resumed: once each
                self.trial.report(value, epoch)
            self.trial.set_user_attr("best", best)
            self.trial.set_user_attr("best_epoch", best_epoch)
            self.trial.set_user_attr("epochs_done", epoch)
            if epoch < self.epochs and self.trial.should_prune():  # the last epoch completes the trial
                self.trial.set_user_attr("pruned_at", epoch)
                reason = f"Optuna's {self.pruner} pruner stopped this trial at epoch {epoch}"
        return distributed.broadcast(reason)


def from_environment(epochs: int) -> TrialReporter | None:
    """The reporter for the trial sweep.py started this run (of `epochs` epochs) as, if it did."""
    text = os.environ.get(ENVIRONMENT)
    if not text:
        return None
    trial = json.loads(text)
    return TrialReporter(trial["storage"], trial["study"], trial["number"], trial["pruner"], epochs)


def environment(storage: str, study: str, number: int, pruner: tuple[str, dict]) -> dict[str, str]:
    """The variable sweep.py sets for trial `number`."""
    value = {"storage": storage, "study": study, "number": number, "pruner": list(pruner)}
    return {ENVIRONMENT: json.dumps(value)}
