import subprocess
import sys

import pytest

from echoic import __version__
from echoic.cli import main


def test_python_dash_m_and_help():
    result = subprocess.run(
        [sys.executable, "-m", "echoic", "--help"], capture_output=True, text=True, check=True
    )
    for command in ("synth", "import", "prepare"):
        assert command in result.stdout


@pytest.mark.parametrize("command", ["synth", "import", "prepare"])
def test_each_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as exited:
        main([command, "--help"])
    assert exited.value.code == 0
    assert "usage: echoic" in capsys.readouterr().out


def test_version_and_unknown_command(capsys):
    with pytest.raises(SystemExit):
        main(["--version"])
    assert __version__ in capsys.readouterr().out
    with pytest.raises(SystemExit) as exited:
        main(["transcribe-everything"])
    assert exited.value.code == 2
