"""The config's `export:` block during training: export.py run in a process of its own on a checkpoint file,
so that it can never touch the training's RNGs, memory or timing beyond a CPU it shares. With `when: best`
each new model_best.pth starts one (a newer best supersedes a running one); with `when: end` the best (else
the last) checkpoint is exported once training ends. The run waits for the last one and reports it in one
line. Rank 0 only."""

import json
import subprocess
import sys
from pathlib import Path

EXPORT_SCRIPT = Path(__file__).resolve().parent.parent / "export.py"


class ExportJob:
    def __init__(self, export_format: str, when: str, flags: list[str]):
        self.format, self.when, self.flags = export_format, when, flags
        self.process: subprocess.Popen | None = None
        self.out: Path | None = None
        self.result = ""

    def best_saved(self, path: Path) -> None:
        """A new model_best.pth: export it now (when: best)."""
        if self.when == "best":
            self._start(path)

    def finish(self, best: Path | None, last: Path) -> str:
        """Export at the end (when: end), wait for the export running, and say how it went in one line."""
        process, out = self.process, self.out
        if self.when == "end" or process is None or out is None:
            process, out = self._start(best if best is not None and best.exists() else last)
        process.wait()
        log = out / "export.log"
        try:
            checks = json.loads((out / "export.json").read_text())["checks"]
        except (OSError, ValueError, KeyError):
            checks = []
        if process.returncode == 0 and checks:
            files = ", ".join(Path(check["file"]).name for check in checks)
            worst = max(check["max_abs_error"] for check in checks)
            self.result = f"{out} ({files} verified, max abs error {worst:.1e})"
        else:
            self.result = f"FAILED (exit {process.returncode}); see {log}"
        return self.result

    def _start(self, checkpoint: Path) -> tuple[subprocess.Popen, Path]:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()  # a newer best supersedes it
            self.process.wait()
        self.out = checkpoint.parent / "export"
        self.out.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, str(EXPORT_SCRIPT), "-r", str(checkpoint), "--format", self.format,
                   "--out", str(self.out), *self.flags]  # fmt: skip
        with (self.out / "export.log").open("w") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=Path.cwd())
        return self.process, self.out
