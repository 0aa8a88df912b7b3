"""The option table: every framework-owned config key with its check, default and doc, in one place.

It drives validation, the defaults written into config.yaml, and `train.py --help`. A project declares
its own keys in the same form in `trainer/options.py`. Imports no torch: `--help` lists this table at once.
"""

import inspect
from typing import Any, Callable, NamedTuple

from .logger_choice import check_loggers

REQUIRED = object()


class Option(NamedTuple):
    """check(value) returns what is wrong with a value, or None."""

    check: Callable[[Any], str | None]
    default: Any
    doc: str


def integer(minimum: int, maximum: int | None = None) -> Callable[[Any], str | None]:
    """An int (not a bool) of at least `minimum` (and at most `maximum`)."""

    def check(value: Any) -> str | None:
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            return f"must be an integer >= {minimum}, not {value!r}"
        if maximum is not None and value > maximum:
            return f"must be an integer <= {maximum}, not {value!r}"
        return None

    return check


def number(minimum: float = float("-inf")) -> Callable[[Any], str | None]:
    """An int or float (not a bool) of at least `minimum`."""

    def check(value: Any) -> str | None:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < minimum:
            return f"must be a number >= {minimum}, not {value!r}"
        return None

    return check


def choice(*choices: Any) -> Callable[[Any], str | None]:
    """One of `choices`."""
    return lambda value: (
        None if value in choices else f"must be one of {', '.join(map(str, choices))}, not {value!r}"
    )


def of_type(kind: type | tuple[type, ...], name: str) -> Callable[[Any], str | None]:
    """An instance of `kind`, described to the user as `name`."""
    return lambda value: None if isinstance(value, kind) else f"must be {name}, not {value!r}"


def optional(check: Callable[[Any], str | None]) -> Callable[[Any], str | None]:
    """None, or what `check` accepts."""
    return lambda value: None if value is None else check(value)


def string_list(value: Any) -> str | None:
    if isinstance(value, list) and all(isinstance(item, str) for item in value):
        return None
    return f"must be a list of names, not {value!r}"


def parse_monitor(text: object) -> tuple[str, str] | None:
    """`off` -> None; `min val_loss` -> ('min', 'val_loss'); anything else raises ValueError. YAML 1.1 reads
    an unquoted `off` as false, which means the same."""
    if text == "off" or text is False:
        return None
    parts = text.split() if isinstance(text, str) else []
    if len(parts) != 2 or parts[0] not in ("min", "max"):
        raise ValueError(
            f"must be 'off' or 'min <metric>' / 'max <metric>' (e.g. 'min val_loss'), not {text!r}"
        )
    return parts[0], parts[1]


def _monitor(value: Any) -> str | None:
    try:
        parse_monitor(value)
    except ValueError as error:
        return str(error)
    return None


PRECISIONS = ("32", "bf16-mixed", "16-mixed")
_PRECISION_ALIASES = {
    "fp32": "32",
    "float32": "32",
    "32-true": "32",
    "fp16": "16-mixed",
    "16": "16-mixed",
    "half": "16-mixed",
    "float16": "16-mixed",
    "bf16": "bf16-mixed",
    "bfloat16": "bf16-mixed",
}


def _precision(value: Any) -> str | None:
    if (str(value) in PRECISIONS or value == "auto") and not isinstance(value, bool):
        return None
    hint = _PRECISION_ALIASES.get(str(value).lower())
    return f"must be auto or one of {', '.join(PRECISIONS)}, not {value!r}" + (
        f" (did you mean '{hint}'?)" if hint else ""
    )


def _init_scheme(value: Any) -> str | None:
    from base.base_model import INIT_SCHEMES  # the schemes live with the code that applies them

    return choice(*INIT_SCHEMES)(value)


def _ema(value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, dict) or set(value) - {"decay"}:
        return f"must be null or a mapping {{decay: 0.999}}, not {value!r}"
    decay = value.get("decay", 0.999)
    if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0 < decay < 1:
        return f"decay must be a number between 0 and 1, not {decay!r}"
    return None


def _compile(value: Any) -> str | None:
    if isinstance(value, bool):
        return None
    if not isinstance(value, dict):
        return f"must be true, false or a mapping of torch.compile arguments, not {value!r}"
    import torch  # only when a config sets compile options

    known = [name for name in inspect.signature(torch.compile).parameters if name != "model"]
    unknown = [key for key in value if key not in known]
    return (
        f"'{unknown[0]}' is not an argument of torch.compile; it takes {', '.join(known)}"
        if unknown
        else None
    )


def _callable_spec(value: Any) -> str | None:
    if isinstance(value, str) or (isinstance(value, dict) and "type" in value):
        return None
    return f"must be a function or class name, or a mapping with 'type' and optional 'args', not {value!r}"


def _callable_specs(value: Any) -> str | None:
    if isinstance(value, list) and not any(_callable_spec(item) for item in value):
        return None
    return f"must be a list of names or of mappings with 'type' and optional 'args', not {value!r}"


def _named_sections(value: Any) -> str | None:
    if isinstance(value, dict) and value and all(isinstance(node, dict) for node in value.values()):
        return None
    return f"must be a mapping of names to sections with 'type' and 'args', not {value!r}"


def _named_callables(value: Any) -> str | None:
    if isinstance(value, dict) and value and not any(_callable_spec(spec) for spec in value.values()):
        return None
    return f"must be a mapping of names to function or class names (or {{type, args}}), not {value!r}"


_boolean = of_type(bool, "true or false")


def _boolean_or_auto(value: Any) -> str | None:
    return (
        None if isinstance(value, bool) or value == "auto" else f"must be true, false or auto, not {value!r}"
    )


def _gpus(value: Any) -> str | None:
    if value == "auto" or (isinstance(value, int) and not isinstance(value, bool) and value >= 0):
        return None
    return f"must be auto or a count of GPUs (0 for the CPU), not {value!r}"


_section = of_type(dict, "a mapping with 'type' and 'args'")
EXPORT_FORMATS, EXPORT_WHEN = ("both", "onnx", "pt2"), ("best", "end")


def _export(value: Any) -> str | None:
    if not isinstance(value, dict) or set(value) - {"format", "when"}:
        return (
            f"must be a mapping with format ({', '.join(EXPORT_FORMATS)}) and when (best, end), not {value!r}"
        )
    if value.get("format", "both") not in EXPORT_FORMATS or value.get("when", "best") not in EXPORT_WHEN:
        return f"format must be one of {', '.join(EXPORT_FORMATS)} and when best or end, not {value!r}"
    return None


TOP_LEVEL = {
    "name": Option(
        of_type(str, "a string"), REQUIRED, "run name: the directory under save_dir/models and /log"
    ),
    "n_gpu": Option(
        _gpus,
        1,
        "GPUs to use (auto: every visible GPU, else the CPU); fewer, with a warning, when fewer exist",
    ),
    "seed": Option(
        integer(0, 2**63 - 1), 123, "seeds python, numpy, torch and CUDA, the data split and the data order"
    ),
    "imports": Option(string_list, [], "packages a checkpoint's config may name types from (see SECURITY)"),
    "arch": Option(optional(_section), None, "the model: type, args, optional init and init_from"),
    "models": Option(optional(_named_sections), None, "several models by name, each like arch"),
    "eval_model": Option(optional(of_type(str, "a model name")), None, "the model test.py evaluates"),
    "data_loader": Option(_section, REQUIRED, "training data: a DataLoader or Dataset type, args"),
    "valid_data_loader": Option(
        optional(_section), None, "validation data (else the loader's split_validation())"
    ),
    "test_data_loader": Option(
        optional(_section), None, "test.py's data (else data_loader with training=False)"
    ),
    "optimizer": Option(optional(_section), None, "type from torch.optim (or a dotted path), args"),
    "optimizers": Option(optional(_named_sections), None, "several optimizers by name: type, args, model"),
    "loss": Option(
        optional(_callable_spec), None, "name in model/loss.py or torch.nn, a dotted path, or {type, args}"
    ),
    "losses": Option(optional(_named_callables), None, "several losses by name, each like loss"),
    "metrics": Option(
        _callable_specs, [], "names in model/metric.py or {type, args, name}: logged as m and val_m"
    ),
    "lr_scheduler": Option(
        optional(_section), None, "type from torch.optim.lr_scheduler, args, optional monitor"
    ),
    "lr_schedulers": Option(optional(_named_sections), None, "schedulers by the optimizer name they step"),
    "export": Option(
        optional(_export), None, "{format: both|onnx|pt2, when: best|end}: export.py in its own process"
    ),
    "trainer": Option(of_type(dict, "a mapping"), {}, "the trainer options below"),
}
WRITTEN_ONLY = ("resolved",)  # config.yaml's record of what `auto` became: ignored when a config is read
TRAINER = {
    "type": Option(of_type(str, "a Trainer class name"), "Trainer", "the trainer class (trainer/*.py)"),
    "epochs": Option(integer(1), 10, "number of epochs to train"),
    "save_dir": Option(
        of_type(str, "a path"), "saved/", "root of models/<name>/<run_id> and log/<name>/<run_id>"
    ),
    "save_period": Option(integer(1), 1, "write checkpoint-epoch<N>.pth every N epochs"),
    "keep_last": Option(integer(0), 0, "keep only the newest K epoch checkpoints (0 keeps all)"),
    "save_every_steps": Option(integer(0), 0, "write checkpoint-last.pth every N optimizer steps (0: off)"),
    "background_saves": Option(
        _boolean_or_auto, "auto", "write checkpoints on a thread while training goes on (auto: on a GPU)"
    ),
    "reuse_host_memory": Option(
        _boolean_or_auto,
        "auto",
        "keep freed host memory for the next batch (glibc's malloc tuned; auto: where it is untuned)",
    ),
    "verbosity": Option(choice(0, 1, 2), 2, "0 warnings, 1 info, 2 debug (the project's loggers only)"),
    "monitor": Option(_monitor, "off", "'min val_loss', 'max val_accuracy' or 'off': picks model_best.pth"),
    "early_stop": Option(integer(0), 0, "stop after N epochs without improvement (0: never)"),
    "tensorboard": Option(_boolean, True, "write TensorBoard event files to the log dir"),
    "loggers": Option(
        check_loggers,
        ["tensorboard", "csv"],
        "where the run's records go: tensorboard, csv (metrics.csv), mlflow, wandb; {type, args} for options",
    ),
    "tensorboard_images": Option(_boolean, False, "log an input image grid per epoch"),
    "tensorboard_histograms": Option(_boolean, False, "log parameter histograms per epoch"),
    "log_step": Option(integer(1), 10, "log the training loss and LR every N batches"),
    "len_epoch": Option(
        optional(integer(1)), None, "batches per epoch (iteration-based training); null: one pass"
    ),
    "lr_step": Option(choice("epoch", "batch"), "epoch", "step the LR scheduler per epoch or per batch"),
    "deterministic": Option(_boolean, False, "deterministic algorithms, cudnn.benchmark off"),
    "progress_bar": Option(_boolean, True, "tqdm bars (also off when stderr is not a terminal)"),
    "summary_depth": Option(
        integer(0), 2, "levels of the model's layer table in info.log (and with --summary); 0: off"
    ),
    "overfit_batches": Option(
        integer(0),
        0,
        "train and validate on the same first N batches: a model that cannot fit them has a bug",
    ),
    "progress_interval": Option(
        number(0), 30, "seconds between progress lines when the console is not a terminal (0: none)"
    ),
    "profile": Option(
        integer(0),
        0,
        "record a torch.profiler trace of N training steps into the log dir's profile/ (0: off)",
    ),
    "on_nonfinite": Option(
        choice("stop", "skip"), "stop", "a nan/inf loss stops the run, or skips that step"
    ),
    "precision": Option(
        _precision,
        "auto",
        "auto (bf16-mixed on a GPU with bfloat16, else 32), 32, bf16-mixed or 16-mixed (adds a GradScaler)",
    ),
    "accumulate_grad_batches": Option(integer(1), 1, "batches per optimizer step (gradient accumulation)"),
    "clip_grad_norm": Option(optional(number(0)), None, "clip the total gradient norm to this (null: off)"),
    "clip_grad_value": Option(optional(number(0)), None, "clip each gradient element to +-this (null: off)"),
    "ema": Option(
        _ema, None, "{decay: 0.999}: validate, pick model_best and test with an EMA of the weights"
    ),
    "compile": Option(
        _compile, False, "torch.compile the model: true, or its arguments {mode, fullgraph, ...}"
    ),
    "channels_last": Option(
        _boolean_or_auto, "auto", "channels_last model and image batches (auto: convolutional models on CUDA)"
    ),
    "sync_batchnorm": Option(
        _boolean, False, "under DDP, BatchNorm statistics over all processes (SyncBatchNorm)"
    ),
    "find_unused_parameters": Option(
        _boolean, False, "under DDP, allow parameters that get no gradient in a step (a skipped branch)"
    ),
}
LOADER_SECTIONS = ("data_loader", "valid_data_loader", "test_data_loader")
# Arguments that make torchvision fetch weights from the network: a checkpoint's config may not set them
# (a dataset's `download` from a checkpoint is turned off instead: present data still loads).
NETWORK_ARGS = ("weights", "weights_backbone", "pretrained", "pretrained_backbone")
SECTION_KEYS = {
    "arch": ("type", "args", "init", "init_from"),
    "optimizer": ("type", "args", "module", "param_groups"),
    "lr_scheduler": ("type", "args", "monitor"),
    **{key: ("type", "args") for key in LOADER_SECTIONS},
}
ARCH_EXTRAS = {
    "init": Option(_init_scheme, None, "initialise Conv/Linear weights; BatchNorm to 1/0"),
    "init_from": Option(
        of_type(dict, "a mapping"), None, "{path, strict: false, exclude: [regex]}: load weights"
    ),
}
RUNTIME_ARGS = {"optimizer": 1, "lr_scheduler": 1}  # params / optimizer, passed by the builders
METRIC_KEYS = ("type", "args", "name")

# Names users bring from PyTorch Lightning and older pytorch-template configs -> torchkiln's key path.
KNOWN_ALIASES = {
    "max_epochs": "trainer.epochs",
    "devices": "n_gpu",
    "gpus": "n_gpu",
    "log_every_n_steps": "trainer.log_step",
    "default_root_dir": "trainer.save_dir",
    "gradient_clip_val": "trainer.clip_grad_norm",
    "accumulate_grad_batches": "trainer.accumulate_grad_batches",
    "precision": "trainer.precision",
    "grad_clip": "trainer.clip_grad_norm",
    "max_grad_norm": "trainer.clip_grad_norm",
    "gradient_accumulation_steps": "trainer.accumulate_grad_batches",
    "bf16": "trainer.precision",
    "fp16": "trainer.precision",
    "deterministic": "trainer.deterministic",
    "enable_progress_bar": "trainer.progress_bar",
}
