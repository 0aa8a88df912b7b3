"""Export a trained model, verified: python export.py -r CHECKPOINT_OR_RUN_DIR [--format F] [--out DIR]

It loads like test.py (weights only, the checkpoint's config as data, digests verified), takes the weights
test.py evaluates (the EMA's when the run kept one, model_best.pth for a run directory), and writes a
torch.export program (.pt2) and/or an ONNX file with a dynamic batch dimension, traced on real samples of
the test (else validation) data. Each file is then run on real samples at batch sizes 1, 2 and a third
against the eager model; export.json records the source, the input spec, versions, tolerances and the
measured errors. A file that fails its check is exit 1 with the numbers; bad input is exit 2.
"""

import json
import sys
from pathlib import Path
from typing import Any

from parse_config import Config, Request, parse_args
from trainer import options as project_options
from utils import user_code
from utils.errors import ConfigError, TrainingError, exit_after

FORMATS = {"pt2": ("model.pt2",), "onnx": ("model.onnx",), "both": ("model.pt2", "model.onnx")}
INSTALL = 'pip install -e ".[export]"'


def lookups() -> dict[str, Any]:
    """builders.lookups(), loaded when validation first needs it."""
    import builders

    return builders.lookups()


def _flags(parser: Any) -> None:
    parser.add_argument("--format", choices=sorted(FORMATS), default="both", help="what to write (both)")
    parser.add_argument("--out", help="directory for the files (default: export/ beside the checkpoint)")


def real_samples(config: Config, minimum: int = 8) -> tuple[Any, str]:
    """At least `minimum` inputs from the test data (else the validation data), and where they came from."""
    import torch

    import builders
    from parse_config.references import References

    try:
        loader, section = builders.test_data(config, References(config.source))
    except ConfigError:
        _, loader = builders.build_data(config, References(config.source))
        section = "validation data"
        if loader is None:
            raise
    inputs = []
    for data, _ in loader:
        inputs.append(data)
        if sum(len(batch) for batch in inputs) >= minimum:
            break
    if not inputs:
        raise ConfigError(f"{config.source}: the {section} yielded no samples to trace and verify the export")
    return torch.cat(inputs)[: max(minimum, 2)], section


def export(config: Config, request: Request) -> dict[str, Any]:
    """Write and verify each format; the manifest (also written as export.json)."""
    import torch

    import builders
    from base import exporting
    from base.checkpointer import model_weights
    from parse_config.shapes import eval_model_name
    from utils.checkpoint import DIGESTS, content_digests
    from utils.weights import load_model_state

    files = FORMATS[request.extra["format"]]
    if "model.onnx" in files:
        _need_onnx()
    out = Path(request.extra["out"] or request.checkpoint_path.parent / "export")
    eval_name = eval_model_name(config.data)
    model = builders.build_model(config, eval_name)
    load_model_state(model, model_weights(request.checkpoint, eval_name, eval_name), request.checkpoint_path)
    model.eval()
    samples, section = real_samples(config)
    example = samples[:2].contiguous()
    with torch.no_grad():
        names = exporting.output_names(model(example))
    out.mkdir(parents=True, exist_ok=True)
    atol, rtol = exporting.TOLERANCES.get(samples.dtype, exporting.TOLERANCES[torch.float32])
    sizes = [1, 2, min(len(samples), 7)]
    checks = []
    for file in files:
        path = out / file
        if file.endswith(".pt2"):
            run = exporting.export_pt2(model, example, path)
        else:
            run = exporting.export_onnx(model, example, path, names)
        checks.append((path, exporting.verify(file, run, model, samples, sizes)))
    checkpoint = request.checkpoint
    weights = checkpoint.get("eval_weights", "state_dict")  # the part exported: its digest as written
    stored = checkpoint.get(DIGESTS) or {}  # a pytorch-template file has none: computed then
    manifest = {
        "checkpoint": {
            "path": str(request.checkpoint_path),
            "digest": stored.get(weights) or content_digests({weights: checkpoint[weights]})[weights],
            "epoch": checkpoint.get("epoch"),
            "monitor": checkpoint.get("monitor"),
            "monitor_best": checkpoint.get("monitor_best"),
        },
        "weights": "ema" if weights == "ema_state_dict" else "trained",
        "inputs": [{"name": "input", "dtype": str(samples.dtype), "shape": ["batch", *samples.shape[1:]]}],
        "outputs": names,
        "traced_on": f"{len(example)} real samples of the {section}",
        "opset": _opset(out / "model.onnx") if "model.onnx" in files else None,
        "versions": _versions(),
        "tolerance": {"atol": atol, "rtol": rtol},
        "checks": [
            {
                "file": str(path),
                "batch_sizes": check.sizes,
                "max_abs_error": check.max_abs,
                "max_rel_error": check.max_rel,
                "top1_agrees": check.top1_agrees,
                "passed": check.passed(atol, rtol),
            }
            for path, check in checks
        ],  # fmt: skip
    }
    (out / "export.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def _need_onnx() -> None:
    for package in ("onnx", "onnxscript", "onnxruntime"):
        try:
            __import__(package)
        except ImportError:
            raise ConfigError(f"--format onnx needs {package}: {INSTALL} (or --format pt2)") from None


def _opset(path: Path) -> int | None:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return next((entry.version for entry in model.opset_import if entry.domain in ("", "ai.onnx")), None)


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for package in ("torch", "onnx", "onnxscript", "onnxruntime"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            found[package] = None
    return found


def main(argv: list[str] | None = None) -> int:
    """Exit status: 0 every file written and verified, 1 a file failed its check or the user's code raised,
    2 bad input."""
    try:
        config, request = parse_args(
            argv, lookups, "Export a checkpoint's model, verified.", project_options.PROJECT_OPTIONS,
            evaluating=True, extra=_flags,
        )  # fmt: skip
        if request.checkpoint is None:
            raise ConfigError(
                "export.py exports a checkpoint: give it with -r CHECKPOINT (or a run directory)"
            )
        manifest = export(config, request)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except TrainingError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except Exception as error:  # raised in the user's model or dataset: show their frames
        print(user_code.describe(error), file=sys.stderr)
        return 1
    atol, rtol = manifest["tolerance"]["atol"], manifest["tolerance"]["rtol"]
    failed = False
    for check in manifest["checks"]:
        verdict = "verified" if check["passed"] else "FAILED"
        top1 = (
            ""
            if check["top1_agrees"] is None
            else f", top-1 {'equal' if check['top1_agrees'] else 'DIFFERS'}"
        )
        print(
            f"{verdict} {check['file']}: batch sizes {check['batch_sizes']}, max abs error "
            f"{check['max_abs_error']:.2e}, max rel error {check['max_rel_error']:.2e}{top1} "
            f"(tolerance atol {atol:g} + rtol {rtol:g})"
        )
        failed |= not check["passed"]
    print(f"Manifest written to {Path(manifest['checks'][0]['file']).parent / 'export.json'}")
    return 1 if failed else 0


if __name__ == "__main__":
    exit_after(main())
