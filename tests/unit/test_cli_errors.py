"""A user's mistake on the command line or in a config ends in the sentence that explains it: no
traceback, no usage of every option; ``--debug`` (or ``DPROBE_DEBUG=1``) brings the traceback back."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from probes.cli.errors import guarded, sentence
from probes.cli.main import main
from tests.conftest import REPO

TINY = str(REPO / "configs" / "tiny.yaml")


def user_error(capsys, *argv: str) -> str:
    """The message ``diffusion-probes *argv`` exits with; nothing else may be printed."""
    with pytest.raises(SystemExit) as done:
        main(list(argv))
    message = str(done.value.code)
    assert done.value.code not in (0, None)
    captured = capsys.readouterr()
    assert "usage:" not in captured.err and "Traceback" not in message, captured.err[-2000:]
    assert len(message.splitlines()) <= 2, message       # the sentence, and how to see the traceback
    return message


def test_misspelt_layer(capsys):
    message = user_error(capsys, "fit", "--config", TINY, "--data.capture.layers", "[up3.O]")
    assert "'up3.O' names no layer" in message and "up3.0" in message


def test_wrong_task_name_is_not_buried_in_the_union_report(capsys):
    message = user_error(capsys, "fit", "--config", TINY, "--model.init_args.tasks", "[foregrond]")
    assert "unknown task 'foregrond'; valid tasks: depth, foreground, shading" in message
    assert "Union" not in message and "Subtypes" not in message


def test_config_file_that_does_not_exist(capsys, tmp_path):
    message = user_error(capsys, "fit", "--config", str(tmp_path / "nope.yaml"))
    assert f"config file {tmp_path / 'nope.yaml'} does not exist" in message
    message = user_error(capsys, "lens", "--config", str(tmp_path / "nope.yaml"))
    assert "does not exist" in message


def test_negative_batch_size(capsys):
    message = user_error(capsys, "fit", "--config", TINY, "--data.batch_size", "-4")
    assert "data.batch_size must be >= 1, got -4" in message


def test_value_of_the_wrong_type(capsys):
    message = user_error(capsys, "fit", "--config", TINY, "--data.batch_size", "abc")
    assert message.startswith("diffusion-probes fit: error: data.batch_size: expected int, got abc")


def test_misspelt_key_on_the_command_line(capsys):
    message = user_error(capsys, "fit", "--config", TINY, "--data.batchsize", "4")
    assert "unknown option --data.batchsize; did you mean --data.batch_size" in message
    message = user_error(capsys, "lens", "--config", str(REPO / "configs/lens/tiny.yaml"), "--featurs.timestep", "3")
    assert "did you mean --features.timestep" in message


def test_misspelt_key_in_yaml(capsys, tmp_path):
    config = tmp_path / "exp.yaml"
    config.write_text(f"defaults: [{TINY}]\ndata:\n  batchsize: 4\n  prompts:\n    limt: 3\n")
    message = user_error(capsys, "fit", "--config", str(config))
    assert "unknown key 'data." in message and "did you mean data." in message
    config.write_text(f"defaults: [{TINY}]\nmodel:\n  init_args:\n    lrr: 0.1\n")
    assert "unknown key 'lrr'" in user_error(capsys, "fit", "--config", str(config))


def test_unknown_command(capsys):
    assert "unknown command 'fitt'; did you mean fit?" in user_error(capsys, "fitt")


def test_debug_raises_the_error_itself(monkeypatch):
    with pytest.raises(ValueError, match="data.batch_size must be >= 1"):
        main(["fit", "--config", TINY, "--data.batch_size", "-4", "--debug"])
    monkeypatch.setenv("DPROBE_DEBUG", "1")
    with pytest.raises(ValueError, match="data.batch_size must be >= 1"):
        main(["fit", "--config", TINY, "--data.batch_size", "-4"])


def test_union_report_reads_as_its_reason():
    report = ('Parser key "model":\n  Does not validate against any of the Union subtypes\n'
              "  Subtypes: [<class 'm.ProbeModule'>, <class 'NoneType'>]\n  Errors:\n"
              "    - Problem with given class_path 'm.ProbeModule':\n        unknown task 'x'; valid tasks: a, b\n"
              "    - Expected a <class 'NoneType'>\n  Given value type: <class 'dict'>\n  Given value: {}")
    assert sentence(report) == "model: unknown task 'x'; valid tasks: a, b"


def test_console_prints_one_line_and_no_traceback():
    """The real process: exit status, stderr as a user sees it, and the traceback with --debug."""
    env = dict(os.environ, WANDB_MODE="disabled", PYTHONPATH=str(REPO))
    argv = [sys.executable, "-m", "probes.cli.main", "fit", "--config", TINY, "--data.batchsize", "4"]
    proc = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "did you mean --data.batch_size" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) <= 3, proc.stderr
    proc = subprocess.run([*argv, "--debug"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "Traceback" in proc.stderr


def test_a_bug_keeps_its_traceback():
    """Only an explained mistake is cut to its sentence: a bare KeyError or a RuntimeError is a bug."""
    def fails(err):
        def run(argv):
            raise err
        return run

    with pytest.raises(KeyError):
        guarded(fails(KeyError("x")), [], "prog")
    with pytest.raises(RuntimeError):
        guarded(fails(RuntimeError("mat1 and mat2 shapes cannot be multiplied")), [], "prog")
    with pytest.raises(SystemExit, match="prog: error: layer 'x' is not in the store"):
        guarded(fails(KeyError("layer 'x' is not in the store")), [], "prog")
