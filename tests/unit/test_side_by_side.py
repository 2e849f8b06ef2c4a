"""Fits side by side as processes: a run that reads another's store starts after it; a failure stops
the rest and names the run, its exit status and its log; torch threads never exceed the cores."""
from __future__ import annotations

import pytest

from probes.cli.side_by_side import Job, RunFailed, log_tail, open_log, run_side_by_side, threads_each


def _prompts(tmp_path, name: str, n: str = "3") -> Job:
    return Job(name, ("toy-prompts", "--n", n, "--out", str(tmp_path / f"{name}.csv")))


def test_a_job_starts_after_the_jobs_it_reads(tmp_path, capsys):
    first = _prompts(tmp_path, "model")
    beside = _prompts(tmp_path, "own_images")
    after = Job("same_images", _prompts(tmp_path, "same_images").argv, after=("model",))
    seconds = run_side_by_side([first, beside, after], slots=2, cores=2, log_dir=tmp_path / "logs", poll=0.05)
    assert set(seconds) == {"model", "own_images", "same_images"}
    assert all((tmp_path / f"{n}.csv").is_file() for n in seconds)
    out = capsys.readouterr().out.splitlines()
    assert out.index(next(ln for ln in out if ln.startswith("[side by side] model: done"))) < \
        out.index(next(ln for ln in out if ln.startswith("[side by side] same_images: started")))
    started = [ln for ln in out if ": started" in ln]
    assert "model: started (1 torch thread;" in started[0] and "own_images: started (1 torch thread;" in started[1]
    assert (tmp_path / "logs" / "model.log").read_text().strip().endswith("model.csv")


def test_a_failed_run_names_itself_its_status_and_its_log(tmp_path):
    good = _prompts(tmp_path, "good")
    bad = _prompts(tmp_path, "bad", n="many")
    with pytest.raises(RunFailed, match=r"run bad failed \(exit status [1-9]\d*\); its log is .*bad\.log") as err:
        run_side_by_side([bad, good], slots=2, cores=2, log_dir=tmp_path / "logs", poll=0.05)
    assert "many" in str(err.value)          # the run's own one-line error, quoted from its log


def test_jobs_that_cannot_start_are_refused(tmp_path):
    with pytest.raises(ValueError, match="not among the jobs"):
        run_side_by_side([Job("a", ("toy-prompts",), after=("b",))], slots=2, cores=2, log_dir=tmp_path)
    with pytest.raises(ValueError, match="wait for each other"):
        run_side_by_side([Job("a", ("toy-prompts",), after=("b",)), Job("b", ("toy-prompts",), after=("a",))],
                         slots=2, cores=2, log_dir=tmp_path)


def test_threads_and_logs():
    assert [threads_each(2, n) for n in (1, 2, 3)] == [2, 1, 1]
    assert threads_each(16, 3) == 5 and threads_each(0, 1) == 1


def test_log_is_not_written_through_a_planted_link_and_its_tail_reads_progress_bars(tmp_path):
    target = tmp_path / "elsewhere.txt"
    target.write_text("keep me")
    (tmp_path / "run.log").symlink_to(target)
    with open_log(tmp_path / "run.log") as f:
        f.write("line one\nbar 10%\rbar 100%\nlast words\n")
    assert target.read_text() == "keep me" and not (tmp_path / "run.log").is_symlink()
    assert log_tail(tmp_path / "run.log", 2) == "bar 100%\nlast words"


def test_the_cli_prints_a_failed_runs_log_lines_as_lines():
    from probes.cli.errors import explain, is_user_error

    err = RunFailed("run x failed (exit status 1); its log is x.log, ending:\nTraceback\nValueError: bad")
    assert is_user_error(err) and explain(err).splitlines()[-1] == "ValueError: bad"
