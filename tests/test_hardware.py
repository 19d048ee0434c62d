"""sats.hardware: the cores a process may use under a container's CPU limit."""

from __future__ import annotations

import os

import pytest
import SimpleITK as sitk
import torch

from sats import hardware
from sats.hardware import cpu_quota_cores

THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS")


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_cgroup_v2_limit_at_own_group_first(tmp_path):
    proc = tmp_path / "proc_cgroup"
    write(proc, "0::/kubepods/pod1\n")
    write(tmp_path / "cg" / "cpu.max", "max 100000\n")
    write(tmp_path / "cg" / "kubepods" / "pod1" / "cpu.max", "150000 100000\n")
    assert cpu_quota_cores(tmp_path / "cg", proc) == 1.5
    (tmp_path / "cg" / "kubepods" / "pod1" / "cpu.max").unlink()  # only the root's: no limit
    assert cpu_quota_cores(tmp_path / "cg", proc) is None
    write(tmp_path / "cg" / "cpu.max", "200000 100000\n")
    assert cpu_quota_cores(tmp_path / "cg", proc) == 2.0
    write(tmp_path / "cg" / "kubepods" / "cpu.max", "120000 100000\n")  # a parent's limit binds too
    assert cpu_quota_cores(tmp_path / "cg", proc) == 1.2


def test_cgroup_v1_limit_and_none(tmp_path):
    proc = tmp_path / "proc_cgroup"
    write(proc, "4:cpu,cpuacct:/\n")
    root = tmp_path / "cg"
    write(root / "cpu,cpuacct" / "cpu.cfs_quota_us", "50000\n")
    write(root / "cpu,cpuacct" / "cpu.cfs_period_us", "100000\n")
    assert cpu_quota_cores(root, proc) == 0.5
    write(root / "cpu,cpuacct" / "cpu.cfs_quota_us", "-1\n")
    assert cpu_quota_cores(root, proc) is None
    write(proc, "4:cpu,cpuacct:/sats_job\n")  # a group of its own below the mount
    write(root / "cpu,cpuacct" / "sats_job" / "cpu.cfs_quota_us", "300000\n")
    write(root / "cpu,cpuacct" / "sats_job" / "cpu.cfs_period_us", "100000\n")
    assert cpu_quota_cores(root, proc) == 3.0
    assert cpu_quota_cores(tmp_path / "nothing", tmp_path / "missing") is None


def test_available_cores_rounds_the_quota_up_and_caps_by_affinity(monkeypatch):
    pinned = len(os.sched_getaffinity(0))
    monkeypatch.setattr(hardware, "cpu_quota_cores", lambda: 0.5)
    assert hardware.available_cores() == 1
    monkeypatch.setattr(hardware, "cpu_quota_cores", lambda: pinned - 0.5)
    assert hardware.available_cores() == pinned
    monkeypatch.setattr(hardware, "cpu_quota_cores", lambda: 10.0 * pinned)
    assert hardware.available_cores() == pinned


def _clear_thread_vars(monkeypatch):
    for var in THREAD_VARS:  # setenv first, so that teardown removes what the code sets
        monkeypatch.setenv(var, "")
        monkeypatch.delenv(var)


@pytest.fixture
def thread_counts():
    """Sets torch's and SimpleITK's thread counts (``thread_counts(n)``) and restores the
    original ones after the test."""
    before = torch.get_num_threads(), sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()

    def start_with(n: int) -> None:
        torch.set_num_threads(n)
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(n)
        assert (torch.get_num_threads(), sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()) == (n, n)

    yield start_with
    torch.set_num_threads(before[0])
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(before[1])


def test_use_available_cores_sets_torch_sitk_and_the_environment(monkeypatch, thread_counts):
    _clear_thread_vars(monkeypatch)
    monkeypatch.setattr(hardware, "available_cores", lambda: 2)
    thread_counts(5)  # more threads than cores: the call must bring both down
    assert hardware.use_available_cores() == 2
    assert torch.get_num_threads() == 2
    assert sitk.ProcessObject.GetGlobalDefaultNumberOfThreads() == 2
    assert all(os.environ[v] == "2" for v in THREAD_VARS)


def test_the_users_thread_count_wins(monkeypatch, thread_counts):
    _clear_thread_vars(monkeypatch)
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    monkeypatch.setattr(hardware, "available_cores", lambda: 1)
    thread_counts(5)
    assert hardware.use_available_cores() == 3
    assert torch.get_num_threads() == 5 and sitk.ProcessObject.GetGlobalDefaultNumberOfThreads() == 5
    assert "MKL_NUM_THREADS" not in os.environ


def test_every_command_starts_on_the_available_cores(monkeypatch, tmp_path, thread_counts):
    from typer.testing import CliRunner

    from sats.cli import app

    _clear_thread_vars(monkeypatch)
    monkeypatch.setattr(hardware, "available_cores", lambda: 1)
    thread_counts(3)
    result = CliRunner().invoke(app, ["evaluate", "--pred", str(tmp_path / "none"), "--gt", str(tmp_path / "none")])
    assert result.exit_code == 1  # a missing folder: one line, after the start-up
    assert os.environ["OMP_NUM_THREADS"] == "1" and torch.get_num_threads() == 1
    assert sitk.ProcessObject.GetGlobalDefaultNumberOfThreads() == 1
