"""The config room: YAML/JSON and the command line -> a validated `Config` of plain data and a `Request`.

loading     files and overrides (bounded, safe YAML)      options      the option table
validation  every problem at once, with key paths          resolution   type names, trust policy
loaders, callables, schedulers: each section kind, checked and built in one place
logger_choice  trainer.loggers, checked (a tracker's package installed)
config      Config: the data and the factory               cli          the command line
compat      pytorch-template's ConfigParser and old keys

Importing this package loads no torch: `train.py --help` answers at once.
"""

from .cli import Request, make_arg_parser, parse_args, with_defaults
from .compat import ConfigParser, upgrade_legacy_schema
from .config import Config
from .loading import FloatSafeLoader, deep_merge, load_config_file, parse_override, set_key
from .options import REQUIRED, TOP_LEVEL, TRAINER, Option, choice, integer, number, of_type, optional
from .resolution import resolve_type

__all__ = [
    "Config",
    "ConfigParser",
    "FloatSafeLoader",
    "Option",
    "REQUIRED",
    "Request",
    "TOP_LEVEL",
    "TRAINER",
    "choice",
    "deep_merge",
    "integer",
    "load_config_file",
    "make_arg_parser",
    "number",
    "of_type",
    "optional",
    "parse_args",
    "parse_override",
    "resolve_type",
    "set_key",
    "upgrade_legacy_schema",
    "with_defaults",
]
