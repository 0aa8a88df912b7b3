"""The training loop users edit (trainer.py) and the project's own config keys (options.py)."""
