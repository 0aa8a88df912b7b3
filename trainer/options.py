"""Your project's own config keys: declare them here and they are validated, defaulted, written to
config.yaml and listed by `python train.py --help`, like the framework's.

A key is a top-level name (`num_classes`) or `trainer.<name>` (`trainer.warmup_epochs`). Read them in
your code from the plain config dict: `self.config["num_classes"]` and `self.options["warmup_epochs"]`
in the Trainer. Checks come from parse_config.options (integer, number, choice, of_type, optional). A key that
is not declared still works, with a notice, unless it is a misspelling of a framework key.
"""

from parse_config.options import Option

PROJECT_OPTIONS: dict[str, Option] = {}
