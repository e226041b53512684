"""The `lotus` command and run reports, as a user runs them."""

import json
import subprocess
import sys

import pytest

from lotus_kernels.recipe import cli
from lotus_kernels.recipe.reporting import report

MICRO = {
    "model": "vit_micro_cifar",
    "dataset": "synthetic",
    "synthetic_train": 256,
    "synthetic_test": 128,
    "batch_size": 64,
    "epochs": 1,
    "warmup_epochs": 0.5,
    "progress": False,
}


def test_parse_overrides_reads_json_values_and_raw_strings():
    assert cli.parse_overrides(["epochs=5", "lr=3e-4", "compile=true", "amp=none", "data_path=/x/y.tar.gz", "init_from=null"]) == {
        "epochs": 5,
        "lr": 3e-4,
        "compile": True,
        "amp": "none",
        "data_path": "/x/y.tar.gz",
        "init_from": None,
    }
    with pytest.raises(ValueError, match="key=value"):
        cli.parse_overrides(["epochs"])


def test_config_files_yaml_and_json(tmp_path):
    (tmp_path / "a.yaml").write_text("epochs: 3\nlr: 0.001\nmodel: vit_micro_cifar\n")
    (tmp_path / "a.json").write_text(json.dumps({"epochs": 3}))
    (tmp_path / "bad.yaml").write_text("- a list\n")
    (tmp_path / "a.toml").write_text("")
    assert cli.load_config_file(tmp_path / "a.yaml") == {"epochs": 3, "lr": 0.001, "model": "vit_micro_cifar"}
    assert cli.load_config_file(tmp_path / "a.json") == {"epochs": 3}
    with pytest.raises(ValueError, match="mapping"):
        cli.load_config_file(tmp_path / "bad.yaml")
    with pytest.raises(ValueError, match=".yaml, .yml or .json"):
        cli.load_config_file(tmp_path / "a.toml")
    with pytest.raises(ValueError, match="does not exist"):
        cli.load_config_file(tmp_path / "missing.yaml")


def test_report_from_a_metrics_file(tmp_path):
    rows = [
        {"epoch": 1, "train_loss": 2.1, "test_loss": 2.0, "train_acc": 0.2, "test_acc": 0.25, "epoch_time_s": 1.0},
        {"epoch": 2, "train_loss": 1.5, "test_loss": 1.6, "train_acc": 0.45, "test_acc": 0.41, "epoch_time_s": 1.0},
    ]
    # A resumed run can repeat an epoch: its last line wins.
    lines = [json.dumps(r) for r in rows] + [json.dumps({**rows[1], "test_acc": 0.42})]
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    (tmp_path / "config.json").write_text(json.dumps({"model": "vit_micro_cifar", "dataset": "synthetic"}))
    path = report.write_report(tmp_path)
    text = path.read_text()
    # Accuracies as percentages, like every report.
    assert "(synthetic data)" in text and "| epoch |" in text and "test_acc (%)" in text and "test_acc 42.00%" in text
    assert "| 42.00 |" in text and "41.00" not in text
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "![loss and accuracy per epoch](curves.png)" in text


def test_report_errors_name_the_file(tmp_path):
    with pytest.raises(ValueError, match="metrics.jsonl does not exist"):
        report.read_metrics(tmp_path)
    (tmp_path / "metrics.jsonl").write_text('{"epoch": 1}\nnot json\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl:2 is not JSON"):
        report.read_metrics(tmp_path)


def test_flags_map_to_config_fields():
    args = cli.build_parser().parse_args(["train", "--data", "synthetic", "--preset", "tiny", "--epochs", "3", "--pretrained"])
    assert cli.flag_fields(args) == {"model": "vit_tiny_cifar", "dataset": "synthetic", "epochs": 3, "pretrained": True}
    args = cli.build_parser().parse_args(["train", "--model", "deit_tiny_patch16_224", "--init-from", "w.pt", "--data-path", "x.tar"])
    assert cli.flag_fields(args) == {"model": "deit_tiny_patch16_224", "init_from": "w.pt", "data_path": "x.tar"}


def test_bad_input_exits_2_with_one_line(tmp_path, capsys):
    assert cli.main(["train", "--set", "epochs"]) == 2
    assert "lotus train: error: --set expects key=value" in capsys.readouterr().err
    assert cli.main(["train", "--resume"]) == 2
    assert "--resume needs --out" in capsys.readouterr().err
    assert cli.main(["eval", "--checkpoint", str(tmp_path / "nope.pt")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert cli.main(["train", "--preset", "huge", "--out", str(tmp_path / "r")]) == 2
    assert "huge" in capsys.readouterr().err
    assert cli.main(["train", "--preset", "tiny", "--model", "x"]) == 2
    assert "not both" in capsys.readouterr().err
    assert cli.main(["train", "--data", "cifar10", "--data-path", str(tmp_path / "missing.tar.gz"), "--out", str(tmp_path / "r2")]) == 2
    assert "missing.tar.gz" in capsys.readouterr().err


def test_module_entry_point():
    result = subprocess.run([sys.executable, "-m", "lotus_kernels", "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "train" in result.stdout and "eval" in result.stdout
    result = subprocess.run([sys.executable, "-m", "lotus_kernels", "--version"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == f"lotus_kernels {__import__('lotus_kernels').__version__}"


def test_every_argument_of_every_command_says_what_it_is():
    import argparse

    (commands,) = [a for a in cli.build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    assert sorted(commands.choices) == sorted(cli.COMMANDS)
    missing = [
        f"{name} {action.option_strings or action.dest}"
        for name, sub in commands.choices.items()
        for action in sub._actions
        if not isinstance(action, argparse._HelpAction) and not action.help
    ]
    assert missing == []


@pytest.mark.parametrize(
    "error,code,line",
    [
        (PermissionError(13, "Permission denied", "/runs/x"), 2, "lotus report: error: Permission denied: /runs/x\n"),
        (NotADirectoryError(20, "Not a directory", "/a/file/run"), 2, "lotus report: error: Not a directory: /a/file/run\n"),
        (KeyboardInterrupt(), 130, "lotus report: interrupted\n"),
    ],
)
def test_file_system_errors_and_ctrl_c_are_one_line(monkeypatch, capsys, error, code, line):
    def fail(args):
        raise error

    parser = cli.build_parser
    monkeypatch.setattr(cli, "build_parser", lambda: _with_func(parser(), "report", fail))
    assert cli.main(["report", "somewhere"]) == code
    assert capsys.readouterr().err == line


def _with_func(parser, command, func):
    import argparse

    (commands,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    commands.choices[command].set_defaults(func=func)
    return parser


def test_train_resume_eval_report_end_to_end(tmp_path, capsys):
    config = tmp_path / "micro.yaml"
    config.write_text("\n".join(f"{k}: {json.dumps(v)}" for k, v in MICRO.items()) + "\n")
    run = tmp_path / "run"
    assert cli.main(["train", "--config", str(config), "--out", str(run)]) == 0
    for name in ("config.json", "metrics.jsonl", "report.md", "curves.png", "checkpoints/last.pt"):
        assert (run / name).exists(), name
    assert len(report.read_metrics(run)) == 1
    # Extend the finished run by one epoch.
    assert cli.main(["train", "--out", str(run), "--resume", "--set", "epochs=2"]) == 0
    history = report.read_metrics(run)
    assert [row["epoch"] for row in history] == [1, 2]
    capsys.readouterr()
    assert cli.main(["eval", "--checkpoint", str(run / "checkpoints" / "last.pt")]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["split"] == "test" and result["dataset"] == "synthetic" and result["n"] == 128
    assert result["acc"] == pytest.approx(history[-1]["test_acc"], abs=1e-6)
    # A finished run is not overwritten by accident.
    assert cli.main(["train", "--config", str(config), "--out", str(run)]) == 2
    assert "resume" in capsys.readouterr().err
    assert cli.main(["train", "--config", str(config), "--out", str(run), "--overwrite"]) == 0


def test_eval_of_a_sparsified_run(tmp_path, capsys):
    import torch

    from lotus_kernels import SparseLinear, sparsify_
    from lotus_kernels.recipe.engine import TrainConfig, build_model, model_from_checkpoint, train

    config = TrainConfig.from_dict(MICRO)
    model = sparsify_(build_model(config, num_classes=10), "2:4")
    result = train(config, tmp_path / "sparse", model=model)
    rebuilt = model_from_checkpoint(result.final_checkpoint)
    assert isinstance(rebuilt.blocks[0].attn.qkv, SparseLinear)
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(rebuilt(x), result.model.eval()(x))
    assert cli.main(["eval", "--checkpoint", str(result.final_checkpoint)]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["n"] == 128


def test_prune_and_finetune_are_commands(capsys):
    assert {"prune", "finetune"} <= set(cli.COMMANDS)
    for command in ("prune", "finetune"):
        assert command in cli.__doc__
        with pytest.raises(SystemExit) as exit_info:
            cli.main([command, "--help"])
        assert exit_info.value.code == 0
        assert "--checkpoint" in capsys.readouterr().out
    args = cli.build_parser().parse_args(["prune", "--checkpoint", "d.pt", "--out", "o"])
    assert (args.method, args.sparsity, args.pattern, args.es_sparsities) == ("instant-soup", 0.5, "unstructured", None)
    args = cli.build_parser().parse_args(["finetune", "--checkpoint", "p.pt", "--out", "o"])
    # --mode not given is None (online once --keep-ratio picks tickets; a mode without it is an error).
    assert (args.epochs, args.lr, args.keep_ratio, args.selector, args.mode) == (5, None, None, None, None)


def test_train_profile_quick_fills_only_what_the_user_left_out(monkeypatch, capsys):
    from lotus_kernels.recipe.engine import TrainConfig, quick_recipe

    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    given = {"dataset": "synthetic", "epochs": 2, "lr": 1e-3}
    fields = cli.apply_profile("auto", dict(given))
    assert fields == {**quick_recipe(), **given}  # the user's values win
    assert "quick profile" in capsys.readouterr().err
    TrainConfig.from_dict(fields)

    # auto is full (TrainConfig's defaults untouched) for CIFAR-10, for a CUDA device, and when asked.
    assert cli.apply_profile("auto", {"dataset": "cifar10"}) == {"dataset": "cifar10"}
    assert cli.apply_profile("auto", {"device": "cuda"}) == {"device": "cuda"}
    assert cli.apply_profile("full", {}) == {}
    assert cli.apply_profile("quick", {"dataset": "cifar10"})["batch_size"] == quick_recipe()["batch_size"]
    monkeypatch.setattr("torch.cuda.is_available", lambda: True)
    assert cli.apply_profile("auto", {}) == {}
    with pytest.raises(ValueError, match="--profile must be one of"):
        cli.apply_profile("fastest", {})


def test_pipeline_profile_fills_the_dense_runs_fields_and_leaves_the_demo_alone(monkeypatch, capsys):
    from lotus_kernels.recipe.engine import fast_recipe

    monkeypatch.setattr("torch.cuda.is_available", lambda: True)
    parse = cli.build_parser().parse_args
    # auto on CUDA with CIFAR-10: the fast recipe, as `lotus train` picks it; the user's fields win.
    fields = cli._pipeline_fields(parse(["pipeline", "--data", "cifar10", "--epochs", "3", "--set", "train.lr=1e-3"]))
    assert fields["train"] == {**fast_recipe(), "dataset": "cifar10", "epochs": 3, "lr": 1e-3}
    assert "lotus pipeline: fast profile" in capsys.readouterr().err
    # The pipeline's own fields are not the profile's business.
    assert set(fields) == {"train"}
    # --demo brings its own recipe: auto leaves it exactly as it is, an explicit profile fills the rest.
    assert cli._pipeline_fields(parse(["pipeline", "--demo"])) == cli.DEMO_PIPELINE
    filled = cli._pipeline_fields(parse(["pipeline", "--demo", "--profile", "fast"]))["train"]
    assert filled == {**fast_recipe(), **cli.DEMO_PIPELINE["train"]}
    # full: TrainConfig's defaults, nothing filled; ablate (no --profile) never fills.
    assert cli._pipeline_fields(parse(["pipeline", "--data", "cifar10", "--profile", "full"]))["train"] == {"dataset": "cifar10"}
    assert cli._pipeline_fields(parse(["ablate", "--data", "cifar10"]))["train"] == {"dataset": "cifar10"}


def test_train_profile_is_recorded_in_the_run_and_not_reapplied_on_resume(tmp_path, capsys):
    out = tmp_path / "run"
    config = tmp_path / "micro.json"
    config.write_text(json.dumps({**MICRO, "device": "cpu"}))
    assert cli.main(["train", "--config", str(config), "--profile", "quick", "--out", str(out)]) == 0
    saved = json.loads((out / "config.json").read_text())
    assert saved["augment"] is False and saved["synthetic_train"] == MICRO["synthetic_train"]
    capsys.readouterr()
    assert cli.main(["train", "--out", str(out), "--resume", "--set", "epochs=2"]) == 0
    assert "quick profile" not in capsys.readouterr().err
    assert json.loads((out / "config.json").read_text())["augment"] is False


def test_prune_flags_left_out_take_prune_checkpoints_defaults_and_the_help_says_them():
    import inspect
    import re

    from lotus_kernels.recipe.stages import InstantSoupStage, prune_checkpoint

    defaults = {name: p.default for name, p in inspect.signature(prune_checkpoint).parameters.items()}
    assert defaults["ingredients"] == InstantSoupStage.ingredients and defaults["isp_lr"] == InstantSoupStage.isp_lr
    prune = cli.build_parser()._subparsers._group_actions[0].choices["prune"]
    checked = 0
    for action in prune._actions:
        name = {"isp_epochs": "ingredient_epochs"}.get(action.dest, action.dest)
        said = re.search(r"\(default ([0-9.e-]+)", action.help or "")
        if said and name in defaults and name not in ("sparsity", "block_size", "es_sparsities"):
            assert action.default is None, f"--{action.dest} must leave its default to prune_checkpoint"
            assert float(said.group(1)) == defaults[name], f"--{action.dest}'s help says {said.group(1)}, the default is {defaults[name]}"
            checked += 1
    assert checked == 7
