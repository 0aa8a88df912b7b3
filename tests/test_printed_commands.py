"""Every command a run prints works when pasted into a shell: test, continue and resume, for the default
config, a OneCycle schedule, a config naming a file.py type, and paths with a space, a quote and a `$`."""

import re
import subprocess
import sys

import pytest
from test_project_shapes import BRANCHY

import train
from conftest import ROOT, run_dir, tiny_config, write_config


def _paste(command, tmp_path):
    """Run a printed command in bash from the directory it was printed in (the tests run outside the project
    root, so only the scripts' location is filled in)."""
    command = command.split("  (")[0]  # an explanation in parentheses follows two spaces
    command = re.sub(r"^python (train|test|export)\.py", lambda m: f"{sys.executable} {ROOT}/{m[1]}.py", command)
    return subprocess.run(["bash", "-c", command], cwd=tmp_path, capture_output=True, text=True, timeout=300)


def _printed(out, label):
    return next(line.split(label, 1)[1].strip() for line in out.splitlines() if line.startswith(f"  {label}"))


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["one-cycle-odd-path", "file-type"])
def test_the_summary_commands_run_as_printed(tmp_path, capsys, kind):
    config = tiny_config(tmp_path, epochs=1)
    if kind == "file-type":
        (tmp_path / "branchy.py").write_text(BRANCHY)
        config["arch"] = {"type": f"{tmp_path}/branchy.py:Branchy"}
    else:  # a OneCycle schedule, and a save_dir with a space, a quote and a `$`
        config["lr_scheduler"] = {"type": "OneCycleLR", "args": {"max_lr": 0.01, "total_steps": "auto"}}
        config["trainer"]["lr_step"] = "batch"
        config["trainer"]["save_dir"] = str(tmp_path / "my runs' $HOME")
    assert train.main(["-c", str(write_config(tmp_path, config)), "--run-id", "run"]) == 0
    out = capsys.readouterr().out
    test, train_on, deploy = _printed(out, "test"), _printed(out, "continue"), _printed(out, "deploy")
    assert ("--trust-checkpoint-config" in test) == (kind == "file-type")
    if kind != "file-type":
        assert "'" in test and "$HOME" in test
        assert "arch.init_from.path=" in train_on and "lr_scheduler.args.total_steps=auto" in train_on
    assert ("--trust-checkpoint-config" in deploy) == (kind == "file-type")
    for command in (test, train_on, deploy + " --format pt2"):
        result = _paste(command, tmp_path)
        assert result.returncode == 0, (command, result.stderr)


@pytest.mark.slow
def test_the_resume_command_after_a_signal_runs_as_printed(tmp_path):
    (tmp_path / "branchy.py").write_text(BRANCHY)
    (tmp_path / "stop.py").write_text("import os, pathlib, signal, torch\n\n\ndef stop_once(output, target):\n"
                                      "    if torch.is_grad_enabled() and not pathlib.Path('stopped').exists():\n"
                                      "        pathlib.Path('stopped').touch()\n"
                                      "        os.kill(os.getpid(), signal.SIGTERM)\n"
                                      "    return (output.argmax(1) == target).float().mean()\n")
    config = tiny_config(tmp_path, epochs=1)
    config["arch"] = {"type": f"{tmp_path}/branchy.py:Branchy"}
    config["metrics"] = [f"{tmp_path}/stop.py:stop_once"]
    process = subprocess.run([sys.executable, str(ROOT / "train.py"), "-c", str(write_config(tmp_path, config)),
                              "--run-id", "run"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert process.returncode == 143
    resume = (process.stdout + process.stderr).split("resume with: ", 1)[1].splitlines()[0]
    assert resume.endswith(" --trust-checkpoint-config")
    assert _paste(resume, tmp_path).returncode == 0
    assert (run_dir(tmp_path, "run") / "checkpoint-epoch1.pth").is_file()


def test_a_one_cycle_run_resumes_but_is_not_extended(tmp_path, capsys):
    config = tiny_config(tmp_path, epochs=2, lr_step="batch")
    config["lr_scheduler"] = {"type": "OneCycleLR", "args": {"max_lr": 0.01, "total_steps": "auto"}}
    assert train.main(["-c", str(write_config(tmp_path, config)), "--run-id", "cycle"]) == 0
    run = run_dir(tmp_path, "cycle")
    assert train.main(["-r", str(run / "checkpoint-epoch1.pth"), "--run-id", "again"]) == 0  # auto: 16 again
    capsys.readouterr()
    assert train.main(["-r", str(run), "trainer.epochs=4"]) == 2
    assert capsys.readouterr().err == (
        f"error: {run}/checkpoint-last.pth: OneCycleLR was fixed to 16 steps when this run began and cannot run 32: "
        "train on in a new run from its weights (init_from the checkpoint, the schedule's total_steps: auto)\n")
