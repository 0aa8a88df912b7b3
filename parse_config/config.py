"""`Config`: the validated config as plain data, where each part came from, and the factory that builds from
it.

It holds no tensors, no checkpoint and no command-line flags (those are the `Request`'s), so it can be written
to config.yaml and into checkpoints as it is.
"""

import re
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any, Callable

from utils.errors import ConfigError
from utils.user_code import raised_in_library, raised_in_user_code

from .blame import blamed_key, download_failure
from .resolution import Lookup, resolve_type, section_kind


@dataclass
class Config:
    """`data` is the resolved config; `trusted_paths` the key paths the user gave on this command line
    (None: all of it is the user's, no checkpoint config is involved), which decides how far a `type` may
    reach."""

    data: dict
    source: str
    user_data: dict = field(default_factory=dict)
    trusted_paths: set[str] | None = None
    allowed_imports: tuple[str, ...] = ()
    overrides: list[str] = field(default_factory=list)

    def __getitem__(self, key: str) -> Any:
        return self.data[key]

    @property
    def trainer(self) -> dict:
        return self.data["trainer"]

    def is_trusted(self, key_path: str) -> bool:
        """Whether the user gave this key (or the list it is in, for `metrics[1].type`) rather than a
        checkpoint."""
        if self.trusted_paths is None:
            return True
        in_list = re.sub(r"\[\d+\].*$", "", key_path)
        return key_path in self.trusted_paths or (in_list != key_path and in_list in self.trusted_paths)

    def located(self, path: str, problem: str) -> str:
        """`file: key.path: problem`, or `override 'k=v': key.path: problem` when an override set that key."""
        for text in self.overrides:
            key = text.partition("=")[0]
            if path == key or path.startswith(key + ".") or key.startswith(path + "."):
                return f"override '{text}': {path}: {problem}"
        return f"{self.source}: {path}: {problem}"

    def resolve(self, key_path: str, name: str, lookup: Lookup) -> Any:
        """Resolve a `type` found at key_path, with the trust its source deserves."""
        return resolve_type(
            name, lookup, self.is_trusted(key_path), self.allowed_imports, section_kind(key_path)
        )

    def construct(
        self,
        path: str,
        type_name: str,
        args: dict,
        lookup: Lookup,
        *runtime_args: Any,
        refs: Any = None,
        **runtime_kwargs: Any,
    ) -> Any:
        """Call the class or function that `type_name` names with the config's args, `${...}` references
        among them resolved by `refs` (parse_config/references.py). An exception raised in the user's own code
        propagates (their file and line, exit 1); one raised by a library on the config's values is a
        ConfigError naming the key path."""
        args = refs.substitute(args, f"{path}.args") if refs is not None else args
        clash = sorted(set(args) & set(runtime_kwargs))
        if clash:
            raise ConfigError(
                f"{self.source}: {path}.args.{clash[0]} is set in the config and passed by the code; "
                "remove it from the config"
            )
        constructor = self.resolve(f"{path}.type", type_name, lookup)
        try:
            return constructor(*runtime_args, **args, **runtime_kwargs)
        except ConfigError:
            raise
        except Exception as error:  # which code raised decides who is told: the user's code, or the config
            offline = download_failure(error)
            if offline is not None:  # whoever's code fetched it: the network, not the code, is the problem
                problem = (
                    f"{type_name} could not download its data ({offline}): without network access, put its "
                    "files under its root yourself (or run once where the network is reachable)"
                )
                raise ConfigError(self.located(f"{path}.args.download", problem)) from None
            key = blamed_key(error, args)
            if raised_in_user_code(error) and not (key and raised_in_library(error)):
                raise  # a library refusing a config value that the user's constructor passed on: the config's
            reason = str(error).splitlines()[0] if str(error) else type(error).__name__
            raise ConfigError(
                self.located(
                    f"{path}.args{'.' + key if key else ''}", f"{type_name} refused its args: {reason}"
                )
            ) from None

    def node(self, path: str) -> Any:
        """The value at a dotted key path (`models.generator`)."""
        value = self.data
        for key in path.split("."):
            value = value[key]
        return value

    def build(
        self, path: str, *runtime_args: Any, lookup: Lookup = None, refs: Any = None, **runtime_kwargs: Any
    ) -> Any:
        """Instantiate the section at `path` (`optimizer`, `models.generator`) from its `type` and `args`,
        plus what only the code can provide."""
        node = self.node(path)
        args = dict(node.get("args") or {})
        return self.construct(path, node["type"], args, lookup, *runtime_args, refs=refs, **runtime_kwargs)

    def init_obj(self, key: str, module: ModuleType, *args: Any, **kwargs: Any) -> Any:
        """pytorch-template's name for build()."""
        return self.build(key, *args, lookup=module, **kwargs)

    def init_ftn(self, key: str, module: ModuleType, *args: Any, **kwargs: Any) -> Callable:
        """pytorch-template's partial application: section `key`'s function with its args (and those
        given)."""
        node = self.data[key]
        function = self.resolve(f"{key}.type", node["type"], module)
        return lambda *more_args, **more_kwargs: function(
            *args, *more_args, **node.get("args", {}), **kwargs, **more_kwargs
        )
