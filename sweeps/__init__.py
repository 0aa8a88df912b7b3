"""Hyperparameter sweeps on Optuna (sweep.py): each trial an ordinary torchkiln run, the study in a database.

spec      the sweep file: read, checked against the base config, turned into each trial's overrides
study     the Optuna study: storage, sampler and pruner, the sweep's definition, claiming trials
trials    running one trial as `train.py` in a child process, and the worker loop around it
ledger    trials.csv and the summary at the end
reporter  the trial's side, inside train.py: the monitored metric to Optuna each epoch, and its pruning

Optuna loads only inside these modules' functions: the rest of torchkiln never needs it.
"""
