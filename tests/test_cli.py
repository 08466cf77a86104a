"""lmforge.cli: help for every command, one-line errors with exit status 2; lmforge.registry: the command registry."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from dataclasses import dataclass

import pytest

from lmforge import __version__, cli
from lmforge import registry as commands


@dataclass
class EchoConfig:
    n: int = 1
    word: str = "hi"


@pytest.fixture
def registry(monkeypatch):
    """A private copy of the command registry, so test commands do not leak into other tests."""
    monkeypatch.setattr(commands, "COMMANDS", dict(commands.COMMANDS))
    monkeypatch.setattr(cli, "COMMAND_MODULES", list(cli.COMMAND_MODULES))
    return commands.COMMANDS


@pytest.fixture
def echo(registry):
    @commands.command("echo", help="print the config", arguments=commands.add_config_arguments)
    def run(args):
        cfg = commands.config_from_args(EchoConfig, args)
        print(f"{cfg.word} x{cfg.n}")
        return 3 if cfg.n == 3 else None

    return run


def exit_code(argv):
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    return info.value.code


def command_names():
    cli.build_parser()  # imports COMMAND_MODULES, which registers their commands
    return sorted(commands.COMMANDS)


def test_top_level_help_and_version(capsys):
    assert exit_code(["--help"]) == 0
    out = capsys.readouterr().out
    assert "usage: lmforge" in out and "model-info" in out
    assert exit_code(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"lmforge {__version__}"


@pytest.mark.parametrize("name", command_names())
def test_every_command_has_help(name, capsys):
    assert exit_code([name, "--help"]) == 0
    assert f"usage: lmforge {name}" in capsys.readouterr().out


def test_no_command_prints_help_and_fails(capsys):
    assert cli.main([]) == 2
    assert "usage: lmforge" in capsys.readouterr().err


def test_python_dash_m_help_is_fast_and_torch_free():
    done = subprocess.run([sys.executable, "-m", "lmforge", "--help"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "usage: lmforge" in done.stdout
    # Building help for every command must not import torch: registered modules keep heavy imports lazy.
    probe = textwrap.dedent(
        """
        import contextlib, io, sys
        from lmforge import cli, registry
        cli.build_parser()  # registers every command
        for argv in [["--help"]] + [[name, "--help"] for name in sorted(registry.COMMANDS)]:
            with contextlib.suppress(SystemExit), contextlib.redirect_stdout(io.StringIO()):
                cli.main(argv)
        print("torch" in sys.modules)
        """
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"


def test_command_with_config_and_overrides(echo, tmp_path, capsys):
    path = tmp_path / "echo.yaml"
    path.write_text("n: 2\nword: yo\n")
    assert cli.main(["echo", "--config", str(path)]) == 0
    assert capsys.readouterr().out == "yo x2\n"
    assert cli.main(["echo", "n=5"]) == 0
    assert capsys.readouterr().out == "hi x5\n"
    assert cli.main(["echo", "--config", str(path), "word=hey"]) == 0
    assert capsys.readouterr().out == "hey x2\n"


def test_overrides_on_both_sides_of_an_option(echo, tmp_path, capsys):
    path = tmp_path / "echo.yaml"
    path.write_text("")
    assert cli.main(["echo", "word=a", "--config", str(path), "n=4"]) == 0
    assert capsys.readouterr().out == "a x4\n"


def test_return_value_is_the_exit_status(echo, capsys):
    assert cli.main(["echo", "n=3"]) == 3


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["echo", "--config", "missing.yaml"], "config file not found: missing.yaml"),
        (["echo", "nn=2"], "unknown key 'nn' in override 'nn=2' (did you mean 'n'?)"),
        (["echo", "n=abc"], "override n=abc: expected an int, got 'abc'"),
        (["echo", "oops"], "override 'oops' must look like key=value"),
    ],
)
def test_user_errors_print_one_line_and_exit_2(echo, capsys, argv, expected):
    assert cli.main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.count("\n") == 1
    assert captured.err.startswith(f"lmforge: error: {expected}")


def test_file_errors_from_a_stage_are_one_line(registry, capsys):
    @commands.command("boom", help="fail like a stage would")
    def boom(args):
        raise FileExistsError("run folder runs/x already exists and is not empty; pass --resume")

    assert cli.main(["boom"]) == 2
    assert capsys.readouterr().err == (
        "lmforge: error: run folder runs/x already exists and is not empty; pass --resume\n"
    )


def test_dashed_override_gets_a_hint(echo, capsys):
    assert exit_code(["echo", "--n=2"]) == 2
    assert "overrides take no dashes" in capsys.readouterr().err


def test_unknown_option_is_a_usage_error(echo):
    assert exit_code(["echo", "--bogus"]) == 2


def test_duplicate_command_name_is_refused(registry):
    with pytest.raises(ValueError, match="registered twice"):
        commands.command("model-info", help="again")(lambda args: None)


def test_command_modules_register_lazily(registry, tmp_path, monkeypatch, capsys):
    (tmp_path / "lmforge_test_stage_cmds.py").write_text(
        textwrap.dedent(
            """
            from lmforge.registry import command

            def arguments(parser):
                parser.add_argument("--times", type=int, default=1)

            @command("hello", help="say hello", arguments=arguments)
            def hello(args):
                print("hello " * args.times)
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    cli.COMMAND_MODULES.append("lmforge_test_stage_cmds")
    assert cli.main(["hello", "--times", "2"]) == 0
    assert capsys.readouterr().out.strip() == "hello hello"
    monkeypatch.delitem(sys.modules, "lmforge_test_stage_cmds")


def model_config():
    model = pytest.importorskip("lmforge.model")
    if not hasattr(model, "ModelConfig"):
        pytest.skip("lmforge.model has no ModelConfig yet")
    return model.ModelConfig


def test_model_info_prints_the_summary(tmp_path, capsys):
    ModelConfig = model_config()
    assert cli.main(["model-info"]) == 0
    assert capsys.readouterr().out.strip() == ModelConfig().summary().strip()
    path = tmp_path / "model.yaml"
    path.write_text("n_layer: 2\n")
    assert cli.main(["model-info", "--config", str(path), "d_model=128", "n_head=4"]) == 0
    expected = ModelConfig(n_layer=2, d_model=128, n_head=4).summary()
    assert capsys.readouterr().out.strip() == expected.strip()


def test_model_info_bad_key_is_one_line(tmp_path, capsys):
    model_config()
    path = tmp_path / "model.yaml"
    path.write_text("n_layers: 2\n")
    assert cli.main(["model-info", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown key 'n_layers'" in err and "n_layer" in err
