"""The config system: both formats, every lookup route of `type`, overrides, and one test per error."""
import json
import subprocess
import sys

import pytest
import torch
import yaml

import train
from conftest import ROOT, TINY, files_under, tiny_config, write_config
from parse_config import (
    TOP_LEVEL,
    TRAINER,
    FloatSafeLoader,
    load_config_file,
    parse_args,
    parse_override,
    resolve_type,
)
from utils.errors import ConfigError

CONFIGS = sorted((ROOT / "configs").glob("*.*"))
PYTORCH_TEMPLATE_CONFIG = {  # victoresque/pytorch-template's config.json, data_dir pointed at our copy
    "name": "Mnist_LeNet", "n_gpu": 1,
    "arch": {"type": "MnistModel", "args": {}},
    "data_loader": {"type": "MnistDataLoader", "args": {"data_dir": str(ROOT / "data/mnist-5k"), "batch_size": 128,
                                                        "shuffle": True, "validation_split": 0.1, "num_workers": 2}},
    "optimizer": {"type": "Adam", "args": {"lr": 0.001, "weight_decay": 0, "amsgrad": True}},
    "loss": "nll_loss", "metrics": ["accuracy", "top_k_acc"],
    "lr_scheduler": {"type": "StepLR", "args": {"step_size": 50, "gamma": 0.1}},
    "trainer": {"epochs": 100, "save_dir": "saved/", "save_period": 1, "verbosity": 2, "monitor": "min val_loss",
                "early_stop": 10, "tensorboard": True},
}


def parse(*argv: str):
    return parse_args(list(argv), train.lookups())[0]


def test_yaml_and_json_configs_are_the_same_run():
    assert load_config_file(ROOT / "configs/mnist.yaml") == load_config_file(ROOT / "configs/mnist.json")


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_validates(path):
    assert parse("-c", str(path)).data["name"]


def test_pytorch_template_config_json_runs_unchanged(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(PYTORCH_TEMPLATE_CONFIG))
    config = parse("-c", str(path))
    assert config.trainer["early_stop"] == 10 and config.trainer["monitor"] == "min val_loss"


def test_yaml_reads_exponents_as_floats_and_keeps_yaml_types():
    data = yaml.load("a: 1e-3\nb: 3E4\nc: 10\nd: '1e-3'\ne: 1.5\nf: true", Loader=FloatSafeLoader)
    assert data == {"a": 0.001, "b": 30000.0, "c": 10, "d": "1e-3", "e": 1.5, "f": True}
    assert isinstance(data["b"], float) and isinstance(data["c"], int)


def test_type_lookup_routes(tmp_path):
    assert resolve_type("Adam", torch.optim) is torch.optim.Adam
    import torchvision.models
    assert resolve_type("torchvision.models.resnet18", torch.optim) is torchvision.models.resnet18
    model_file = tmp_path / "nets.py"
    model_file.write_text("import torch\nclass Net(torch.nn.Linear):\n    def __init__(self):\n"
                          "        super().__init__(784, 10)\n")
    net = resolve_type(f"{model_file}:Net", None)
    assert net.__name__ == "Net" and isinstance(net(), torch.nn.Linear)


def test_file_model_builds_through_the_factory(tmp_path):
    model_file = tmp_path / "nets.py"
    model_file.write_text("import torch\nclass Wide(torch.nn.Module):\n    def __init__(self, width):\n"
                          "        super().__init__()\n        self.fc = torch.nn.Linear(784, width)\n")
    config = parse("-c", str(write_config(tmp_path, TINY)), f"arch.type={model_file}:Wide", "arch.args.width=7")
    assert config.build("arch").fc.out_features == 7


def test_overrides_parse_values_as_yaml_and_add_known_keys(tmp_path):
    config = parse("-c", str(write_config(tmp_path, TINY)), "optimizer.args.lr=3e-4", "trainer.epochs=5",
                   "metrics=[accuracy, top_k_acc]", "trainer.save_every_steps=4", "arch.args.num_classes=10",
                   "lr_scheduler.type=ExponentialLR", "lr_scheduler.args={gamma: 0.9}", "trainer.tensorboard=false")
    assert config["optimizer"]["args"]["lr"] == 3e-4 and config.trainer["epochs"] == 5
    assert config["metrics"] == ["accuracy", "top_k_acc"] and config.trainer["save_every_steps"] == 4
    assert config["lr_scheduler"] == {"type": "ExponentialLR", "args": {"gamma": 0.9}}
    assert config["arch"]["args"] == {"num_classes": 10} and config.trainer["tensorboard"] is False


def test_override_fills_a_section_the_file_sets_to_null(tmp_path):
    config = parse("-c", str(write_config(tmp_path, {**TINY, "lr_scheduler": None})),
                   "lr_scheduler.type=StepLR", "lr_scheduler.args.step_size=2")
    assert config["lr_scheduler"] == {"type": "StepLR", "args": {"step_size": 2}}


def test_resolved_config_has_every_default(tmp_path):
    minimal = {key: TINY[key] for key in ("name", "arch", "data_loader", "optimizer", "loss")}
    config = parse("-c", str(write_config(tmp_path, minimal)))
    assert config["seed"] == 123 and config["metrics"] == [] and config["lr_scheduler"] is None
    assert config.trainer["epochs"] == 10 and config.trainer["monitor"] == "off"
    assert list(config.data) == ["name", "n_gpu", "seed", "imports", "arch", "data_loader", "valid_data_loader",
                                 "test_data_loader", "optimizer", "loss", "metrics", "lr_scheduler", "export",
                                 "trainer"]


def test_help_lists_every_option_with_its_default(capsys):
    with pytest.raises(SystemExit) as exit_info:
        train.main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for key, option in TRAINER.items():
        assert f"  {key:<24}{option.doc} ({option.default!r})" in text
    assert all(f"  {key:<24}" in text for key in TOP_LEVEL)


def test_override_splits_on_first_equals_sign_only():
    assert parse_override("trainer.monitor=a=b") == (["trainer", "monitor"], "a=b")


def test_lr_and_bs_shortcuts(tmp_path):
    config = parse("-c", str(write_config(tmp_path, TINY)), "--lr", "1e-4", "--bs", "16")
    assert config["optimizer"]["args"]["lr"] == 1e-4 and config["data_loader"]["args"]["batch_size"] == 16


def test_print_config_prints_resolved_config_and_writes_nothing(tmp_path, capsys):
    path = write_config(tmp_path, tiny_config(tmp_path))
    assert train.main(["-c", str(path), "--print-config", "trainer.epochs=3"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["trainer"]["epochs"] == 3 and printed["optimizer"]["type"] == "Adam"
    assert files_under(tmp_path) == [path]


def test_pytorch_template_factory_api(tmp_path):
    config = parse("-c", str(write_config(tmp_path, TINY)))
    params = [torch.nn.Parameter(torch.zeros(2))]
    assert config.init_obj("optimizer", torch.optim, params).defaults["lr"] == 3e-3
    with pytest.raises(ConfigError, match=r"optimizer\.args\.lr is set in the config and passed by the code"):
        config.init_obj("optimizer", torch.optim, params, lr=0.1)
    schedule = config.init_ftn("lr_scheduler", torch.optim.lr_scheduler)
    assert schedule(torch.optim.SGD(params, lr=1.0)).gamma == 0.5


def _without(section: str) -> dict:
    return {k: v for k, v in TINY.items() if k != section}


def _renamed(old: str, new: str) -> dict:
    return {new if k == old else k: v for k, v in TINY.items()}


FILE_ERRORS = [  # (config, overrides, expected message after "error: <file>: ")
    (_renamed("optimizer", "optimzer"), [], "optimzer: unknown top-level key (did you mean 'optimizer'?); if 'optimzer' is your own key, declare it in trainer/options.py"),
    (_without("arch"), [], "arch: is required: add it (the model: type, args, optional init and init_from)"),
    ({**TINY, "trainer": {**TINY["trainer"], "epochs": "ten"}}, [], "trainer.epochs: must be an integer >= 1, not 'ten'"),
    ({**TINY, "trainer": {**TINY["trainer"], "epochs": 0}}, [], "trainer.epochs: must be an integer >= 1, not 0"),
    ({**TINY, "trainer": {**TINY["trainer"], "save_period": -1}}, [],
     "trainer.save_period: must be an integer >= 1, not -1"),
    ({**TINY, "trainer": {**TINY["trainer"], "monitor": "mid val_loss"}}, [],
     "trainer.monitor: must be 'off' or 'min <metric>' / 'max <metric>' (e.g. 'min val_loss'), not 'mid val_loss'"),
    ({**TINY, "trainer": {**TINY["trainer"], "monitor": "max val_acc"}}, [],
     "trainer.monitor: 'val_acc' is not a produced metric (did you mean 'val_accuracy'?); "
     "choose from loss, accuracy, val_loss, val_accuracy"),
    ({**TINY, "data_loader": {"type": "MnistDataLoader", "args": {"batch_size": 4}}}, [],
     "data_loader.args.data_dir: is a required argument of MnistDataLoader; add it"),
    ({**TINY, "data_loader": {**TINY["data_loader"], "args": {**TINY["data_loader"]["args"],
                                                            "transforms": [{"type": "ToTensr"}]}}}, [],
     "data_loader.args.transforms[0].type: unknown type 'ToTensr' in torchvision.transforms (did you mean 'ToTensor'?)"),
    ({**TINY, "arch": {"type": "MnistModel", "init": "kaiming"}}, [],
     "arch.init: must be one of kaiming_uniform, kaiming_normal, xavier_uniform, xavier_normal, orthogonal, "
     "not 'kaiming'"),
]
OVERRIDE_ERRORS = [  # (override, expected message after "error: ")
    ("arch.type=MnistModle",
     "override 'arch.type=MnistModle': arch.type: unknown type 'MnistModle' in model.model (did you mean 'MnistModel'?)"),
    ("optimizer.type=Adamm",
     "override 'optimizer.type=Adamm': optimizer.type: unknown type 'Adamm' in torch.optim (did you mean 'Adam'?)"),
    ("arch.type=nopkg.nets.Net", "override 'arch.type=nopkg.nets.Net': arch.type: 'nopkg.nets.Net' does not import: "
                                 "no module named 'nopkg'"),
    ("arch.type=missing.py:Net", "override 'arch.type=missing.py:Net': arch.type: no such file 'missing.py' "
                                 "(from type 'missing.py:Net')"),
    ("optimizer.args.lrr=0.1",
     "override 'optimizer.args.lrr=0.1': optimizer.args.lrr: is not an argument of Adam (did you mean 'lr'?)"),
    ("trainer.epoch=3", "override 'trainer.epoch=3': trainer.epoch: unknown trainer option (did you mean 'epochs'?); if 'trainer.epoch' is your own key, declare it in trainer/options.py"),
    ("optimizer.args.lr", "override 'optimizer.args.lr': no '='; write key.path=value, e.g. trainer.epochs=5"),
    ("=3", "override '=3': no key before '='; write key.path=value"),
    ("trainer..epochs=1", "override 'trainer..epochs=1': empty part in key path 'trainer..epochs'; write key.path=value"),
]


def _assert_refused(tmp_path, capsys, argv, expected, before):
    assert train.main(argv) == 2
    err = capsys.readouterr().err
    assert err == f"error: {expected}\n"
    assert files_under(tmp_path) == before, "nothing may be written on bad input"


@pytest.mark.parametrize("config, overrides, expected", FILE_ERRORS, ids=[e[2].split(":")[0] for e in FILE_ERRORS])
def test_config_file_errors(tmp_path, capsys, config, overrides, expected):
    path = write_config(tmp_path, config)
    _assert_refused(tmp_path, capsys, ["-c", str(path), *overrides], f"{path}: {expected}", [path])


@pytest.mark.parametrize("override, expected", OVERRIDE_ERRORS, ids=[e[0] for e in OVERRIDE_ERRORS])
def test_override_errors(tmp_path, capsys, override, expected):
    path = write_config(tmp_path, tiny_config(tmp_path))
    _assert_refused(tmp_path, capsys, ["-c", str(path), override], expected, [path])


def test_broken_python_model_file_is_reported(tmp_path, capsys):
    path = write_config(tmp_path, tiny_config(tmp_path))
    broken = tmp_path / "broken.py"
    broken.write_text("import nonexistent_package_xyz\n")
    _assert_refused(tmp_path, capsys, ["-c", str(path), f"arch.type={broken}:Net"],
                    f"override 'arch.type={broken}:Net': arch.type: '{broken}' does not import: "
                    "ModuleNotFoundError: No module named 'nonexistent_package_xyz'", [broken, path])


@pytest.mark.parametrize("name, text, expected", [
    ("missing.yaml", None, "no such config file"),
    ("empty.yaml", "", "the config file is empty"),
    ("bad.yaml", "name: [unclosed\n", "not valid YAML (line 2): expected ',' or ']', but got '<stream end>'"),
    ("bad.json", '{"name": }', "not valid JSON (line 1): Expecting value"),
    ("list.yaml", "- a\n- b\n", "the top level must be a mapping of sections, not list"),
    ("config.txt", "name: x", "a config file must end in .yaml, .yml or .json"),
])
def test_unreadable_config_files(tmp_path, capsys, name, text, expected):
    path = tmp_path / name
    if text is not None:
        path.write_text(text)
    before = files_under(tmp_path)
    _assert_refused(tmp_path, capsys, ["-c", str(path)], f"{path}: {expected}", before)


def test_no_config_and_no_checkpoint(tmp_path, capsys):
    _assert_refused(tmp_path, capsys, [], "give a config file with -c FILE, or a checkpoint to resume with "
                                          "-r CHECKPOINT", [])


def test_errors_reach_the_shell_as_one_line_and_status_2(tmp_path):
    path = write_config(tmp_path, tiny_config(tmp_path))
    result = subprocess.run([sys.executable, str(ROOT / "train.py"), "-c", str(path), "optimizer.type=Adamm"],
                            capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        "error: override 'optimizer.type=Adamm': optimizer.type: unknown type 'Adamm' in torch.optim "
        "(did you mean 'Adam'?)"]
    assert "Traceback" not in result.stdout + result.stderr
    assert files_under(tmp_path) == [path]
