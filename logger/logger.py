"""stdlib logging from logger_config.yaml: console plus info.log in the run's log directory."""
import logging
import logging.config
from pathlib import Path

import yaml

LEVELS = {0: logging.WARNING, 1: logging.INFO, 2: logging.DEBUG}
# The project's own loggers: verbosity applies to these only, so that libraries (PIL, matplotlib, ...) keep
# their WARNING level instead of flooding the console with their debug output.
PROJECT_LOGGERS = ("train", "test", "parse_config", "base", "trainer", "model", "data_loader", "utils", "logger")
_CONFIG_FILE = Path(__file__).with_name("logger_config.yaml")


def setup_logging(log_dir: Path, verbosity: int = 2) -> None:
    """Configure logging; called once by an entry script after the config is validated."""
    config = yaml.safe_load(_CONFIG_FILE.read_text())
    for handler in config["handlers"].values():
        if "filename" in handler:
            handler["filename"] = str(Path(log_dir) / handler["filename"])
    config["loggers"] = {name: {"level": LEVELS[verbosity]} for name in PROJECT_LOGGERS}
    logging.config.dictConfig(config)
