"""torch's CPU thread count: the cores other processes leave free (never torch's one-per-core default on a busy
machine), the user's explicit choice when there is one, and restored after a command run in-process."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import torch

from controlkit.cli import main
from controlkit.devices import cpu_threads, cpu_threads_for_run, use_cpu_threads


def test_busy_cores_are_left_to_the_processes_that_hold_them():
    cores = len(os.sched_getaffinity(0))
    assert 1 <= cpu_threads(0.05) <= cores
    burners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(cores)]
    try:
        time.sleep(0.5)  # the burners hold every core
        assert cpu_threads(0.3) == 1
    finally:
        for burner in burners:  # only the processes this test started
            burner.kill()
            burner.wait()


def test_the_users_choice_wins_and_a_run_restores_the_previous_count(monkeypatch):
    previous = torch.get_num_threads()
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert use_cpu_threads() == 1 and torch.get_num_threads() == 1
    torch.set_num_threads(previous)
    with cpu_threads_for_run(2) as chosen:
        assert chosen == 2 and torch.get_num_threads() == 2
    assert torch.get_num_threads() == previous


def test_before_torch_is_imported_the_count_goes_into_the_environment():
    code = ("import os, sys; from controlkit.devices import cpu_threads_for_run\n"
            "with cpu_threads_for_run(1): inside = os.environ['OMP_NUM_THREADS']; assert 'torch' not in sys.modules\n"
            "import torch; print(inside, 'OMP_NUM_THREADS' in os.environ)")
    env = {key: value for key, value in os.environ.items() if key != "OMP_NUM_THREADS"}
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert completed.stdout.split() == ["1", "False"], completed.stderr


@pytest.mark.parametrize("value", ["0", "-2", "many"])
def test_a_bad_thread_count_is_a_usage_error(value, capsys):
    with pytest.raises(SystemExit) as exited:
        main(["--threads", value, "preprocessors"])
    assert exited.value.code == 2 and f"must be a positive integer, got '{value}'" in capsys.readouterr().err
