"""The `radial-jax` face: every subcommand has --help, the package layout keeps imports one way."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from radial_jax import cli

ROOT = Path(__file__).resolve().parents[2]
APPLICATION = ("models", "convert", "train")


def _imported_packages(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_kernel_library_outside_the_cli_imports_no_application_package():
    offenders = {
        str(path.relative_to(ROOT)): sorted(_imported_packages(path) & set(APPLICATION))
        for path in (ROOT / "radial_jax").rglob("*.py")
        if "cli" not in path.relative_to(ROOT / "radial_jax").parts
    }
    assert {path: pkgs for path, pkgs in offenders.items() if pkgs} == {}


def test_every_subcommand_module_registers_its_parser():
    parser = cli.build_parser()
    choices = parser._subparsers._group_actions[0].choices  # argparse keeps the subparsers here
    assert list(choices) == list(cli.SUBCOMMANDS)
    for name in cli.SUBCOMMANDS:
        assert choices[name].get_default("func").__module__ == f"radial_jax.cli.{name}"


@pytest.mark.parametrize("command", cli.SUBCOMMANDS)
def test_help_exits_zero_without_importing_flax(command):
    code = ("import sys; from radial_jax.cli import main\n"
            f"try:\n    main([{command!r}, '--help'])\nexcept SystemExit as e:\n    assert e.code == 0\n"
            "assert 'flax' not in sys.modules and 'models' not in sys.modules, 'help loaded the model'")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert f"usage: radial-jax {command}" in proc.stdout


def test_ctrl_c_is_one_line_and_exit_130_for_any_subcommand(monkeypatch, capsys):
    from radial_jax.cli import mask

    def interrupted_run(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(mask, "run", interrupted_run)
    assert cli.main(["mask"]) == 130
    assert capsys.readouterr().err == "radial-jax mask: interrupted (SIGINT); nothing written\n"
