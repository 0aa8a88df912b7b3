"""trainer.loggers checked: known names, their arguments, and a tracker's package installed (the extra that
installs it named), before any side effect. logger/trackers.py holds the names and arguments."""

import importlib.util
from typing import Any

from logger.trackers import ARGS, EXTRA, LOGGERS

from .resolution import close_match


def check_loggers(value: Any) -> str | None:
    """What is wrong with a `trainer.loggers` value (a list of names, or of {type, args}), or None."""
    if not isinstance(value, list):
        return f"must be a list of loggers ({', '.join(LOGGERS)}), not {value!r}"
    for item in value:
        name = item.get("type") if isinstance(item, dict) else item
        if not isinstance(name, str) or name not in LOGGERS:
            return f"{name!r} is not one of {', '.join(LOGGERS)}{close_match(str(name), LOGGERS)}"
        odd = isinstance(item, dict) and set(item) - {"type", "args"}
        if odd or (isinstance(item, dict) and not isinstance(item.get("args") or {}, dict)):
            return f"{item!r}: give a logger as its name, or as {{type: {name}, args: {{...}}}}"
        takes = ARGS.get(name, ())
        for key in (item.get("args") or {}) if isinstance(item, dict) else {}:
            if key not in takes:
                hint = close_match(key, takes) if takes else ""
                return f"{name} takes no argument '{key}'{hint} (it takes {', '.join(takes) or 'none'})"
        if name in EXTRA and importlib.util.find_spec(name) is None:
            return f'{name} is not installed: pip install -e ".[{EXTRA[name]}]"'
    return None
