"""A checkpoint is data, never code: every attack below must be refused with nothing run and nothing written."""
import pytest

import new_project
import test as test_script
import train
from conftest import ROOT, files_under, load, run_dir, save_consistent, tiny_config, write_config

MARKER = "pwned"
PAYLOAD = ["sh", "-c", f"touch {MARKER}"]
HINT = ("refused, a downloaded checkpoint is data, not code. To allow it, list its package under `imports:` in your "
        "own -c config, or pass --trust-checkpoint-config (only for checkpoints you made yourself)")
NAME_IT = ("refused, a downloaded checkpoint is data, not code. To allow it, name the type yourself in your own -c "
           "config (or as key.type=... on the command line), or pass --trust-checkpoint-config (only for "
           "checkpoints you made yourself)")  # where listing the package would not lift the refusal


@pytest.fixture
def checkpoint(tmp_path):
    path = write_config(tmp_path, tiny_config(tmp_path, epochs=1))
    assert train.main(["-c", str(path), "--run-id", "honest"]) == 0
    return run_dir(tmp_path, "honest") / "checkpoint-epoch1.pth"


def _poisoned(checkpoint, tmp_path, **config):
    state = load(checkpoint)
    state["config"].update(config)
    return save_consistent(state, tmp_path / "downloaded.pth")


EVIL_PY = f"import subprocess\nsubprocess.run({PAYLOAD!r})\nimport torch\nclass Net(torch.nn.Module):\n    pass\n"
ATTACKS = [  # (config keys the checkpoint carries, key path, expected problem)
    ({"arch": {"type": "subprocess.run", "args": {"args": PAYLOAD}}}, "arch.type",
     "'subprocess.run' is outside the project, torch, torchvision and `imports:`"),
    ({"arch": {"type": "builtins.eval", "args": {}}}, "arch.type",
     "'builtins.eval' is outside the project, torch, torchvision and `imports:`"),
    ({"loss": "os.system"}, "loss", "'os.system' is outside the project, torch, torchvision and `imports:`"),
    ({"metrics": ["subprocess.getoutput"]}, "metrics[0]",
     "'subprocess.getoutput' is outside the project, torch, torchvision and `imports:`"),
    ({"arch": {"type": "torch.os.system", "args": {"command": f"touch {MARKER}"}}}, "arch.type",
     "'torch.os.system' (defined in 'posix') may not be named by a checkpoint's config"),
    ({"arch": {"type": "model.model.torch.hub.load", "args": {"repo_or_dir": ".", "model": "x"}}}, "arch.type",
     "'model.model.torch.hub.load' (defined in 'torch.hub') may not be named by a checkpoint's config"),
    ({"arch": {"type": "torch.load", "args": {"f": "x.pkl", "weights_only": False}}}, "arch.type",
     "'torch.load' (defined in 'torch.serialization') may not be named by a checkpoint's config"),
    ({"arch": {"type": "torch.utils.cpp_extension.load_inline", "args": {"name": "x", "cpp_sources": ""}}},
     "arch.type", "'torch.utils.cpp_extension.load_inline' is in torch.utils.cpp_extension, which a checkpoint's "
                  "config may not name"),
    ({"arch": {"type": "utils.checkpoint.save_checkpoint", "args": {"state": {}, "path": MARKER}}}, "arch.type",
     "'utils.checkpoint.save_checkpoint' (defined in 'utils.checkpoint') may not be named by a checkpoint's config: "
     "functions must come from model, torchvision.models, torch.nn.functional, torchvision.transforms"),
    ({"optimizer": {"type": "torch.nn.Linear", "args": {"in_features": 1, "out_features": 1}}}, "optimizer.type",
     "'torch.nn.Linear' (defined in 'torch.nn.modules.linear') may not be named by a checkpoint's config: "
     "optimizer must be torch.optim.Optimizer"),
    ({"arch": {"type": "torch._C._get_tracing_state", "args": {}}}, "arch.type",
     "'torch._C._get_tracing_state' names a private attribute"),
    ({"imports": ["subprocess"], "arch": {"type": "subprocess.Popen", "args": {"args": PAYLOAD}}}, "arch.type",
     "'subprocess.Popen' is outside the project, torch, torchvision and `imports:`"),
]


@pytest.mark.parametrize("entry", [test_script.main, train.main], ids=["test.py", "train.py"])
@pytest.mark.parametrize("config, key, problem", ATTACKS, ids=[a[1] + ":" + a[2].split("'")[1] for a in ATTACKS])
def test_checkpoint_config_cannot_name_code(tmp_path, checkpoint, capsys, entry, config, key, problem):
    evil = _poisoned(checkpoint, tmp_path, **config)
    before = files_under(tmp_path)
    assert entry(["-r", str(evil)]) == 2
    hint = NAME_IT if any(word in problem for word in ("torch.hub", "torch.serialization", "cpp_extension", "private")) else HINT
    assert capsys.readouterr().err == f"error: {evil}: {key}: {problem}: {hint}\n"
    assert not (tmp_path / MARKER).exists() and files_under(tmp_path) == before


@pytest.mark.parametrize("entry", [test_script.main, train.main], ids=["test.py", "train.py"])
def test_checkpoint_config_cannot_load_a_python_file(tmp_path, checkpoint, capsys, entry):
    (tmp_path / "evil.py").write_text(EVIL_PY)
    evil = _poisoned(checkpoint, tmp_path, arch={"type": f"{tmp_path}/evil.py:Net", "args": {}})
    before = files_under(tmp_path)
    assert entry(["-r", str(evil)]) == 2
    name = f"{tmp_path}/evil.py:Net"
    expected = (f"'{name}' is a Python file named by a checkpoint's config: refused, a downloaded checkpoint is data, "
                "not code. If you trust that file, name it yourself: pass the same type on the command line "
                f"(e.g. arch.type={name}) or in a -c config, or pass --trust-checkpoint-config (only for "
                "checkpoints you made yourself)")
    assert capsys.readouterr().err == f"error: {evil}: arch.type: {expected}\n"
    assert not (tmp_path / MARKER).exists() and files_under(tmp_path) == before


def test_imports_allow_list_and_trust_flag_admit_a_users_own_package(tmp_path, monkeypatch, capsys):
    package = tmp_path / "mynets"
    package.mkdir()
    (package / "__init__.py").write_text("from model.model import MnistModel\n\nclass Net(MnistModel):\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    path = write_config(tmp_path, tiny_config(tmp_path, epochs=1))
    assert train.main(["-c", str(path), "--run-id", "own", "arch.type=mynets.Net"]) == 0
    mine = run_dir(tmp_path, "own") / "checkpoint-epoch1.pth"
    capsys.readouterr()
    assert test_script.main(["-r", str(mine)]) == 2
    assert "arch.type: 'mynets.Net' is outside the project" in capsys.readouterr().err
    assert test_script.main(["-r", str(mine), "--trust-checkpoint-config"]) == 0
    allow = write_config(tmp_path, {"imports": ["mynets"]}, "allow.yaml")
    assert test_script.main(["-r", str(mine), "-c", str(allow)]) == 0


def test_yaml_python_tags_are_refused_and_never_run(tmp_path, capsys):
    path = tmp_path / "evil.yaml"
    path.write_text(f"name: !!python/object/apply:os.system ['touch {MARKER}']\n")
    assert train.main(["-c", str(path)]) == 2
    assert capsys.readouterr().err == (
        f"error: {path}: not valid YAML (line 1): could not determine a constructor for the tag "
        "'tag:yaml.org,2002:python/object/apply:os.system'; Python tags are never executed\n")
    assert not (tmp_path / MARKER).exists() and files_under(tmp_path) == [path]


@pytest.mark.parametrize("argv, key, value", [
    (["name=../../escaped"], "name", "../../escaped"),
    (["name=a/b"], "name", "a/b"),
    (["--run-id", "../escaped"], "--run-id", "../escaped"),
    (["--run-id", ".."], "--run-id", ".."),
])
def test_run_directories_stay_under_save_dir(tmp_path, capsys, argv, key, value):
    workdir = tmp_path / "work"
    workdir.mkdir()
    config = tiny_config(workdir)
    path = write_config(workdir, config)
    before = files_under(tmp_path)
    assert train.main(["-c", str(path), *argv]) == 2
    problem = f"'{value}' may not contain path separators or '..'; use a plain name such as 'mnist_1'"
    where = f"override '{argv[0]}': name" if key == "name" else "--run-id"
    assert capsys.readouterr().err == f"error: {where}: {problem}\n"
    assert files_under(tmp_path) == before


def test_checkpoint_config_name_cannot_escape(tmp_path, checkpoint, capsys):
    evil = _poisoned(checkpoint, tmp_path, name="../../escaped")
    before = files_under(tmp_path.parent)
    assert train.main(["-r", str(evil)]) == 2
    assert "name: '../../escaped' may not contain path separators" in capsys.readouterr().err
    assert files_under(tmp_path.parent) == before


def test_new_project_refuses_the_template_itself_and_non_empty_targets(tmp_path, capsys):
    inside = ROOT / "configs" / "copy"
    assert new_project.main([str(inside)]) == 2
    assert not inside.exists()
    assert capsys.readouterr().err == (f"error: {inside}: is inside the template itself; choose a directory "
                                       f"outside {ROOT}\n")
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "notes.txt").write_text("mine")
    assert new_project.main([str(occupied)]) == 2
    assert capsys.readouterr().err == (f"error: {occupied}: already exists and is not empty; choose a new or "
                                       "empty directory\n")
    assert [p.name for p in occupied.iterdir()] == ["notes.txt"]
    assert new_project.main([str(ROOT)]) == 2


def test_pyproject_requires_a_torch_that_enforces_weights_only():
    assert '"torch>=2.6"' in (ROOT / "pyproject.toml").read_text()
