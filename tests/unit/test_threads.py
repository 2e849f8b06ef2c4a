"""The CPU thread policy: honour OMP_NUM_THREADS, else one thread per core that is free."""
from __future__ import annotations

import pytest

from probes.common.threads import available_cpus, choose_threads


def test_omp_num_threads_is_honoured_whatever_the_load():
    c = choose_threads(env={"OMP_NUM_THREADS": "3"}, available=2, loadavg=5.0, total_cpus=2)
    assert c.threads == 3 and c.source == "OMP_NUM_THREADS"


@pytest.mark.parametrize("value", ["0", "-1", "two"])
def test_bad_omp_num_threads_is_an_error_naming_the_variable(value):
    with pytest.raises(ValueError, match="OMP_NUM_THREADS"):
        choose_threads(env={"OMP_NUM_THREADS": value}, available=2, loadavg=0.0, total_cpus=2)


def test_idle_machine_uses_every_available_core():
    assert choose_threads(env={}, available=2, loadavg=0.1, total_cpus=2).threads == 2


def test_busy_cores_are_left_alone():
    # two cores, one kept busy by another process: one thread, not two fighting over one core
    assert choose_threads(env={}, available=2, loadavg=1.0, total_cpus=2).threads == 1
    # more load than cores: still one thread
    assert choose_threads(env={}, available=2, loadavg=4.0, total_cpus=2).threads == 1
    # 8 cores, ~3 busy
    assert choose_threads(env={}, available=8, loadavg=3.2, total_cpus=8).threads == 5


def test_load_is_scaled_to_our_share_of_the_machine():
    # 4 of 16 cores are ours (taskset / SLURM); 8 busy cores machine-wide -> ~2 of ours busy
    assert choose_threads(env={}, available=4, loadavg=8.0, total_cpus=16).threads == 2


def test_affinity_mask_not_cpu_count_decides_what_is_available(tmp_path):
    no_quota = tmp_path / "cpu.max"
    no_quota.write_text("max 100000\n")
    assert available_cpus(affinity=lambda pid: {0, 3}, cpu_max=no_quota) == 2
    quota = tmp_path / "quota"
    quota.write_text("150000 100000\n")           # a container limited to 1.5 CPUs
    assert available_cpus(affinity=lambda pid: {0, 1, 2, 3}, cpu_max=quota) == 1
    assert available_cpus(affinity=lambda pid: {0, 1, 2}, cpu_max=tmp_path / "absent") == 3
    c = choose_threads(env={}, available=available_cpus(affinity=lambda pid: {5}, cpu_max=no_quota),
                       loadavg=0.0, total_cpus=64)
    assert c.threads == 1


def test_a_load_average_that_lags_behind_a_finished_job_is_checked_against_the_cpus_now():
    # the 1-minute average still counts a job that just ended; the CPUs say they are idle now
    assert choose_threads(env={}, available=2, loadavg=0.9, total_cpus=2, busy_now=0.05).threads == 2
    # a process that really runs shows in both: the core stays left alone
    assert choose_threads(env={}, available=2, loadavg=1.0, total_cpus=2, busy_now=0.97).threads == 1
    # no measurement (no /proc/stat): the load average alone
    assert choose_threads(env={}, available=2, loadavg=0.9, total_cpus=2, busy_now=lambda: None).threads == 1

    def never():
        raise AssertionError("sampled although the load average says every core is free")

    assert choose_threads(env={}, available=2, loadavg=0.1, total_cpus=2, busy_now=never).threads == 2


def test_busy_cpus_are_read_from_proc_stat_deltas(tmp_path):
    from probes.common.threads import busy_cpus_now

    stat = tmp_path / "stat"
    samples = iter([
        "cpu  100 0 100 1000 0 0 0 0 0 0\ncpu0 50 0 50 500 0 0 0 0 0 0\ncpu1 50 0 50 500 0 0 0 0 0 0\n",
        # 400 jiffies later: 100 busy (user 60 + system 40), 300 idle -> a quarter of 2 CPUs
        "cpu  160 0 140 1300 0 0 0 0 0 0\ncpu0 80 0 70 650 0 0 0 0 0 0\ncpu1 80 0 70 650 0 0 0 0 0 0\n",
    ])
    stat.write_text(next(samples))
    assert busy_cpus_now(stat=stat, sleep=lambda s: stat.write_text(next(samples))) == pytest.approx(0.5)
    assert busy_cpus_now(stat=tmp_path / "absent") is None
