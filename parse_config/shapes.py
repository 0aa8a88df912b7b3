"""The project's shape: one model, optimizer, scheduler and loss (`arch`, `optimizer`, `lr_scheduler`,
`loss`), or named ones (`models`, `optimizers`, `lr_schedulers`, `losses`), seen through one view so that
validation, the builders and the checkpoint treat two models as two entries rather than a second code path.

    models:
      generator: {type: Generator, args: {latent: 64}}
      discriminator: {type: Discriminator}
    optimizers:
      generator: {type: Adam, args: {lr: 2.0e-4}, model: generator}
      discriminator: {type: Adam, args: {lr: 2.0e-4}, model: discriminator}
    lr_schedulers:
      generator: {type: StepLR, args: {step_size: 10}}     # keyed by the optimizer it steps
    losses:
      adversarial: BCEWithLogitsLoss
    eval_model: generator                                  # what test.py evaluates (default: the first)

An optimizer steps `model` (one name or a list), optionally only its submodule `module`, or explicit
`param_groups: [{model, module, ...hyperparameters}]`. A single `optimizer` may use `module` and
`param_groups` too.
"""

from typing import Any, NamedTuple

from .resolution import close_match

SINGLE_MODEL, SINGLE_OPTIMIZER, SINGLE_LOSS = "model", "optimizer", "loss"
OPTIMIZER_KEYS = ("type", "args", "model", "module", "param_groups")
# The forms of each part: (single key, named key)
FORMS = {
    "model": ("arch", "models"),
    "optimizer": ("optimizer", "optimizers"),
    "scheduler": ("lr_scheduler", "lr_schedulers"),
    "loss": ("loss", "losses"),
}
SHAPE_KEYS = {key for pair in FORMS.values() for key in pair} | {"eval_model"}


class Entry(NamedTuple):
    name: str
    path: str  # its key path in the config: `arch`, `models.generator`, `optimizers.generator`, ...
    node: Any


def entries(data: dict, part: str) -> list[Entry]:
    """The configured entries of one part, single or named: models, optimizers, schedulers or losses. A
    single scheduler is named after the single optimizer it steps."""
    single, named = FORMS[part]
    if isinstance(data.get(named), dict):
        return [Entry(name, f"{named}.{name}", node) for name, node in data[named].items()]
    if data.get(single) is None:
        return []
    name = {"model": SINGLE_MODEL, "optimizer": SINGLE_OPTIMIZER, "scheduler": SINGLE_OPTIMIZER}.get(
        part, SINGLE_LOSS
    )
    return [Entry(name, single, data[single])]


def eval_model_name(data: dict) -> str:
    """The model test.py evaluates, validation judges and the EMA follows: `eval_model`, else the first."""
    models = entries(data, "model")
    return data.get("eval_model") or (models[0].name if models else SINGLE_MODEL)


def optimized_models(data: dict, optimizer: Entry) -> list[tuple[str, str | None, dict]]:
    """(model name, submodule path or None, extra hyperparameters) for each parameter group it steps."""
    node = optimizer.node
    if isinstance(node.get("param_groups"), list):
        default = node.get("model") or _default_model(data, optimizer)
        return [
            (group.get("model", default), group.get("module"), _hyper(group))
            for group in node["param_groups"]
        ]
    names = node.get("model") or _default_model(data, optimizer)
    names = names if isinstance(names, list) else [names]
    return [(name, node.get("module"), {}) for name in names]


def _hyper(group: dict) -> dict:
    return {key: value for key, value in group.items() if key not in ("model", "module")}


def _default_model(data: dict, optimizer: Entry) -> str:
    names = [entry.name for entry in entries(data, "model")]
    return optimizer.name if optimizer.name in names else names[0] if len(names) == 1 else ""


def check_shape(data: dict) -> list[tuple[str, str]]:
    """(key path, problem): each part given in exactly one form, and every name it refers to known. Call it
    once the shape keys themselves are well-formed (the option table checks that)."""
    from .options import TOP_LEVEL

    errors = []
    for part, (single, named) in FORMS.items():
        if data.get(single) is not None and data.get(named) is not None:
            errors.append((named, f"give either {single} or {named}, not both"))
        elif part != "scheduler" and data.get(single) is None and data.get(named) is None:
            errors.append((single, f"is required: add it ({TOP_LEVEL[single].doc})"))
    if errors:
        return errors
    models = [entry.name for entry in entries(data, "model")]
    optimizers = [entry.name for entry in entries(data, "optimizer")]
    if data.get("lr_scheduler") is not None and data.get("optimizers") is not None:
        errors.append(
            ("lr_scheduler", "with named optimizers, name the scheduler's optimizer under lr_schedulers")
        )
    for entry in entries(data, "scheduler"):
        if entry.name not in optimizers:
            errors.append(
                (
                    entry.path,
                    f"names no optimizer{close_match(entry.name, optimizers)}; schedulers are "
                    f"keyed by the optimizer they step ({', '.join(optimizers)})",
                )
            )
    if data.get("eval_model") is not None and data["eval_model"] not in models:
        errors.append(
            (
                "eval_model",
                f"'{data['eval_model']}' is not a model{close_match(data['eval_model'], models)}; "
                f"choose from {', '.join(models)}",
            )
        )
    for entry in entries(data, "optimizer"):
        if not isinstance(entry.node, dict):
            continue
        for model, _, _ in optimized_models(data, entry):
            if model not in models:
                hint = close_match(str(model), models) if model else ""
                errors.append(
                    (
                        f"{entry.path}.model",
                        f"{'names no model' if model else 'is required'}{hint}: "
                        f"say which model it steps ({', '.join(models)})",
                    )
                )
    return errors
