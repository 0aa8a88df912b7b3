"""Export an evaluation model and prove each file: a torch.export program (.pt2) and ONNX through the current
(dynamo) exporter, both with a dynamic batch dimension, each run on real samples at several batch sizes
against the eager model. What a careful engineer does by hand: eval mode (BatchNorm on its running
statistics, no dropout), an example batch of at least 2 (a batch of 1 would be specialized), named outputs
for a model returning a tuple or a dict, weights as external data only when large.
"""

import contextlib
import io
import logging
import re
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from utils.errors import ConfigError, TrainingError
from utils.user_code import is_user_file

EXTERNAL_DATA_BYTES = 1 << 30  # ONNX files hold at most 2 GiB: larger weights go to a .data file beside it
TOLERANCES = {torch.float32: (1e-4, 1e-3), torch.float16: (1e-2, 1e-2), torch.bfloat16: (5e-2, 5e-2)}


@dataclass
class Check:
    """One artifact's verification: the largest absolute and relative error over every output and batch
    size, and whether a classifier's top-1 class agreed on every sample."""

    artifact: str
    sizes: list[int]
    max_abs: float = 0.0
    max_rel: float = 0.0
    top1_agrees: bool | None = None

    def passed(self, atol: float, rtol: float) -> bool:
        return self.max_abs <= atol + rtol * self._scale and self.top1_agrees is not False

    _scale: float = 1.0  # the largest eager output magnitude: rtol is relative to it


def output_names(output: Any) -> list[str]:
    """`output` for one tensor, `output_0..` for a tuple or list, the keys for a dict."""
    if isinstance(output, torch.Tensor):
        return ["output"]
    if isinstance(output, dict):
        return [str(key) for key in output]
    return [f"output_{index}" for index in range(len(output))]


def flat(output: Any) -> list[torch.Tensor]:
    """The output's tensors in output_names' order."""
    if isinstance(output, torch.Tensor):
        return [output]
    return list(output.values()) if isinstance(output, dict) else list(output)


class _Flattened(nn.Module):
    """The model with its outputs as a flat tuple (ONNX has no dicts): the exported graphs' interface."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.train(False)  # the wrapper too: the exporters read the top module's flag

    def forward(self, inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(flat(self.model(inputs)))


def _dynamic_batch() -> tuple[dict[int, Any]]:
    return ({0: torch.export.Dim("batch", min=1, max=65536)},)


def export_pt2(model: nn.Module, example: torch.Tensor, path: Path) -> Callable[[torch.Tensor], list]:
    """torch.export the model with a dynamic batch, save it, and return the loaded file as a function."""
    with _explained_failures():
        program = torch.export.export(_Flattened(model), (example,), dynamic_shapes=_dynamic_batch())
    torch.export.save(program, str(path))
    loaded = torch.export.load(str(path)).module()
    return lambda inputs: list(loaded(inputs))


def export_onnx(
    model: nn.Module, example: torch.Tensor, path: Path, names: list[str]
) -> Callable[[torch.Tensor], list]:
    """ONNX through torch.onnx.export(dynamo=True) with a dynamic batch, checked by onnx and returned as an
    ONNX Runtime session on the CPU (and on CUDA where ONNX Runtime has it)."""
    import onnx
    import onnxruntime

    weights = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    with _explained_failures():
        torch.onnx.export(
            _Flattened(model),
            (example,),
            str(path),
            dynamo=True,
            verbose=False,
            input_names=["input"],
            output_names=names,
            dynamic_shapes=_dynamic_batch(),
            external_data=weights > EXTERNAL_DATA_BYTES,
        )
    onnx.checker.check_model(str(path))
    session = onnx_session(path, onnxruntime)
    return lambda inputs: [torch.from_numpy(out) for out in session.run(None, {"input": inputs.numpy()})]


def onnx_session(path: Path, onnxruntime: Any = None) -> Any:
    """An ONNX Runtime session for the file: CUDA first where this onnxruntime build has it."""
    if onnxruntime is None:
        import onnxruntime
    wanted = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    providers = [p for p in wanted if p in onnxruntime.get_available_providers()]
    return onnxruntime.InferenceSession(str(path), providers=providers)


class OnnxModel(nn.Module):
    """An exported ONNX file as the evaluation model: test.py's metrics on the file itself, through ONNX
    Runtime. Its outputs come back as the model returned them: a tensor, a tuple, or a dict by name."""

    def __init__(self, path: Path):
        super().__init__()
        self.session = onnx_session(path)
        self.input_name = self.session.get_inputs()[0].name
        self.names = [output.name for output in self.session.get_outputs()]

    def forward(self, inputs: torch.Tensor) -> Any:
        feed = {self.input_name: inputs.detach().contiguous().cpu().numpy()}
        outputs = [torch.from_numpy(out).to(inputs.device) for out in self.session.run(None, feed)]
        if self.names == ["output"]:
            return outputs[0]
        if all(re.fullmatch(r"output_\d+", name) for name in self.names):
            return tuple(outputs)
        return dict(zip(self.names, outputs))


def verify(
    name: str, run: Callable[[torch.Tensor], list], model: nn.Module, samples: torch.Tensor, sizes: list[int]
) -> Check:
    """Run the artifact and the eager model on the first `size` real samples for each size; the errors."""
    check = Check(name, sizes)
    with torch.no_grad():
        for size in sizes:
            inputs = samples[:size].contiguous()
            expected = [t.detach().float().cpu() for t in flat(model(inputs))]
            got = [t.detach().float().cpu() for t in run(inputs)]
            if len(got) != len(expected):
                raise TrainingError(
                    f"{name}: returned {len(got)} outputs where the model returns {len(expected)}"
                )
            for want, have in zip(expected, got):
                error = float((want - have).abs().max()) if want.numel() else 0.0
                scale = float(want.abs().max()) if want.numel() else 1.0
                check.max_abs, check._scale = max(check.max_abs, error), max(check._scale, scale)
                check.max_rel = max(check.max_rel, error / max(scale, 1e-12))  # this output's own
            head = expected[0]
            if head.dim() == 2 and head.shape[1] > 1 and head.is_floating_point():  # a classifier's scores
                agrees = bool((head.argmax(1) == got[0].argmax(1)).all())
                check.top1_agrees = agrees if check.top1_agrees is None else check.top1_agrees and agrees
    return check


_TRACER_LOGGERS = ("torch",)  # their warnings while tracing: kept quiet, the outcome is checked


class _explained_failures:
    """An export that cannot trace the model's Python (a branch on a tensor's value, `.item()`) becomes one
    line naming the user's file and line and what to change; the tracers' own warnings (graph dumps on
    stderr) are kept quiet meanwhile."""

    def __enter__(self) -> None:
        self.levels = {name: logging.getLogger(name).level for name in _TRACER_LOGGERS}
        for name in _TRACER_LOGGERS:
            logging.getLogger(name).setLevel(logging.ERROR)
        self.quiet = contextlib.ExitStack()  # the exporters print progress and, on failure, whole graphs
        chatter = self.quiet.enter_context(io.StringIO())
        self.quiet.enter_context(contextlib.redirect_stdout(chatter))
        self.quiet.enter_context(contextlib.redirect_stderr(chatter))

    def __exit__(self, kind: type | None, error: BaseException | None, trace: Any) -> bool:
        self.quiet.close()
        for name, level in self.levels.items():
            logging.getLogger(name).setLevel(level)
        if error is None or not isinstance(error, Exception):
            return False
        message = str(error)
        data_dependent = re.search(
            r"data.dependent|GuardOnDataDependent|Could not guard on|\.item\(\)", message
        )
        if not data_dependent:
            return False
        where = _user_line(message) or _user_frame(error)
        raise ConfigError(
            f"{where or 'the model'}: export cannot follow Python control flow on a tensor's value "
            "(`if x.sum() > 0`, `.item()`, a loop bounded by a tensor); write it with torch.where or "
            "torch.cond, or move the decision out of forward"
        ) from None


def _user_line(message: str) -> str | None:
    """`file.py:12` of the first user frame in the exporter's message (its user stack), relative if near."""
    for match in re.finditer(r'File "([^"]+)", line (\d+)', message):
        if is_user_file(match.group(1)):
            return f"{_shown(match.group(1))}:{match.group(2)}"
    return None


def _user_frame(error: BaseException) -> str | None:
    frames = [f for f in traceback.extract_tb(error.__traceback__) if is_user_file(f.filename)]
    return f"{_shown(frames[-1].filename)}:{frames[-1].lineno}" if frames else None


def _shown(filename: str) -> str:
    path = Path(filename)
    try:
        return str(path.resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)
