"""core/cli.py: a user's mistake (UserError, or an error type a tool names) is one line and exit code 1; anything else,
a ValueError from a library or from this project's own bug included, keeps its traceback."""
import subprocess
import sys

import pytest

from conftest import ROOT
from core.cli import UserError, one_line, run_main


def fail(error):
    def main(argv):
        raise error
    return main


def test_a_users_mistake_is_one_line_naming_it(capsys):
    assert run_main("tool.py", fail(UserError("--data_dir x: no such folder"))) == 1
    assert capsys.readouterr().err == "tool.py: error: --data_dir x: no such folder\n"


def test_an_error_type_the_tool_names_is_one_line_too(capsys):
    assert run_main("tool.py", fail(FileNotFoundError("gone")), errors=(FileNotFoundError,)) == 1
    assert capsys.readouterr().err == "tool.py: error: gone\n"


@pytest.mark.parametrize("error", [ValueError("operands could not be broadcast together"), KeyError("classes"), TypeError("bug")])
def test_a_bug_is_not_dressed_as_a_users_mistake(error, capsys):
    with pytest.raises(type(error)):
        run_main("tool.py", fail(error))
    assert capsys.readouterr().err == ""


def test_a_bugs_traceback_reaches_a_real_process():
    code = ("from core.cli import run_main, UserError\n"
            "def main(argv): int('a number from our own code')\n"
            "raise SystemExit(run_main('tool.py', main))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and "Traceback" in proc.stderr and "in main" in proc.stderr
    assert "tool.py: error" not in proc.stderr


def test_an_error_from_a_loader_worker_keeps_its_last_line():
    assert one_line(UserError("Caught DataError in DataLoader worker process 0.\nTraceback ...\n"
                              "imagedata.layouts.DataError: x.jpg: not an image")) == "x.jpg: not an image"
