"""Studies and folder predictions on a real Ray cluster started by the test on this machine
(a head and one more node, one CPU each, every address loopback; issue 27)."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from sats.cli import app

from test_ablation import _tiny_with_test_split

# Read by Ray when it is imported: Ray's single-machine mode, every node on 127.0.0.1 (without
# it Ray binds the machine's outward address even for a test cluster).
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
ray = pytest.importorskip("ray")
REPO = Path(__file__).resolve().parents[1]
STUDY = ["--variants", "unet,sats", "--seeds", "0,1", "--no-align", "--patch-size", "16", "32", "32", "--fold", "all"]


@pytest.fixture(scope="module")
def cluster():
    """Ray's own test helper: a head and a worker node as separate processes, bound to loopback."""
    from ray.cluster_utils import Cluster

    assert os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] == "0"
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    worker = c.add_node(num_cpus=1)
    c.wait_for_nodes()
    ray.init(address=c.address)
    try:
        nodes = [n for n in ray.nodes() if n["Alive"]]
        assert len(nodes) == 2 and {n["NodeManagerAddress"] for n in nodes} == {"127.0.0.1"}, nodes
        assert c.address.startswith("127.0.0.1:")
        yield c, worker
    finally:
        ray.shutdown()
        c.shutdown()


def test_without_ray_nothing_imports_it():
    code = "import sys, sats.cli, sats.evaluation.ablation, sats.predict.inference; print('ray' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert out.stdout.strip() == "False", out.stderr


def test_a_worker_that_cannot_see_the_folder_says_so(tmp_path):
    from sats.cluster import _write_token, check_shared
    from sats.geometry.volume import SatsError

    token = _write_token(tmp_path)
    check_shared(str(tmp_path), token)  # the driver's own view passes
    with pytest.raises(SatsError, match="cannot see .* storage that every node mounts"):
        check_shared(str(tmp_path / "elsewhere"), token)


def test_an_address_where_nothing_answers_fails_at_once(tiny_trained_run, tmp_path):
    import socket

    with socket.socket() as s:  # a port that was free a moment ago: nothing listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    run, data = tiny_trained_run
    inp = tmp_path / "in"
    inp.mkdir()
    ct = sorted((data / "imagesTr").iterdir())[0]
    (inp / ct.name).write_bytes(ct.read_bytes())
    t0 = time.monotonic()
    res = CliRunner().invoke(app, ["predict", "-i", str(inp), "-o", str(tmp_path / "out"), "-m", str(run),
                                   "--ray", f"127.0.0.1:{port}"])
    assert res.exit_code != 0 and time.monotonic() - t0 < 30
    assert f"nothing answers at 127.0.0.1:{port}" in res.output and res.output.count("\n") == 1, res.output
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_a_study_on_the_cluster_gives_the_local_results(cluster, tmp_path):
    import torch

    c, _ = cluster
    data = _tiny_with_test_split(tmp_path / "tiny")
    common = ["ablation", str(data), *STUDY, "--epochs", "1", "--iters-per-epoch", "2"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the one thread each Ray task of --ray-cpus 1 uses: the same arithmetic
    try:
        local = CliRunner().invoke(app, [*common, "--out", str(tmp_path / "local")])
    finally:
        torch.set_num_threads(threads)
    assert local.exit_code == 0, local.output
    t0 = time.time()
    remote = CliRunner().invoke(app, [*common, "--out", str(tmp_path / "ray"), "--ray", c.address])
    assert remote.exit_code == 0, remote.output
    assert "4 as Ray tasks on 2 node(s)" in remote.output, remote.output
    for name in ("cases.csv", "summary.json", "summary.md"):
        assert (tmp_path / "ray" / name).read_text() == (tmp_path / "local" / name).read_text(), name
    nodes = {json.loads(line)["node"] for f in (tmp_path / "ray" / "runs").glob("*/ray_attempts.jsonl")
             for line in f.read_text().splitlines()}
    assert len(nodes) == 2, f"the 4 runs used {len(nodes)} node(s) in {time.time() - t0:.0f} s"  # both nodes worked


def test_a_killed_worker_node_costs_no_run_and_no_epoch(cluster, tmp_path):
    """SIGKILL the worker node while a run trains there: Ray retries that run on the head,
    which resumes it from its checkpoint (the epochs logged before the kill are kept as
    they were, timings included), and cases.csv holds every run once."""
    c, worker = cluster
    data = _tiny_with_test_split(tmp_path / "tiny")
    out = tmp_path / "study"
    epochs = 30
    cmd = [sys.executable, "-m", "sats", *["ablation", str(data), *STUDY, "--epochs", str(epochs), "--iters-per-epoch", "3"],
           "--out", str(out), "--ray", c.address]
    driver = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    victim, before = None, None
    deadline = time.time() + 300
    while victim is None and time.time() < deadline and driver.poll() is None:
        for attempts in out.glob("runs/*/ray_attempts.jsonl"):
            run = attempts.parent
            first = json.loads(attempts.read_text().splitlines()[0])
            log = run / "log.csv"
            if first["node"] == worker.node_id and log.exists() and not (run / "model.pt").exists():
                rows = log.read_text().splitlines()
                if 3 <= len(rows) - 1 < epochs - 5:
                    victim, before = run, rows
                    break
        time.sleep(0.05)
    assert victim is not None, "no run was seen training on the worker node"
    c.remove_node(worker, allow_graceful=False)  # SIGKILL of the node's processes, the run's worker among them
    try:
        output, _ = driver.communicate(timeout=600)
    finally:
        c.add_node(num_cpus=1)  # two nodes again for the tests that follow
        c.wait_for_nodes()
    assert driver.returncode == 0, output[-3000:]
    attempts = [json.loads(line) for line in (victim / "ray_attempts.jsonl").read_text().splitlines()]
    assert len(attempts) == 2 and attempts[1]["node"] != worker.node_id
    assert attempts[1]["epochs_done_before"] >= len(before) - 1 - 1  # it resumed after the last checkpoint, not at 0
    final = (victim / "log.csv").read_text().splitlines()
    assert final[: len(before) - 1] == before[:-1] or final[: len(before)] == before  # the epochs before the kill, as logged then
    assert [int(r["epoch"]) for r in csv.DictReader(final)] == list(range(1, epochs + 1))
    rows = list(csv.DictReader(open(out / "cases.csv")))
    keys = [(r["variant"], r["seed"], r["case"]) for r in rows]
    assert len(keys) == len(set(keys)) == 2 * 2 * 2  # 2 arms x 2 seeds x 2 test cases, each once


def test_a_folder_predicted_by_two_actors_matches_the_local_files(cluster, tiny_trained_run, tmp_path):
    import torch

    c, _ = cluster
    run, data = tiny_trained_run
    inputs = tmp_path / "in"
    inputs.mkdir()
    for f in sorted((data / "imagesTr").iterdir())[:4]:
        (inputs / f.name).write_bytes(f.read_bytes())
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        local = CliRunner().invoke(app, ["predict", "-i", str(inputs), "-o", str(tmp_path / "local"), "-m", str(run)])
    finally:
        torch.set_num_threads(threads)
    assert local.exit_code == 0, local.output
    remote = CliRunner().invoke(app, ["predict", "-i", str(inputs), "-o", str(tmp_path / "ray"), "-m", str(run), "--ray",
                                      c.address, "--ray-workers", "2"])
    assert remote.exit_code == 0, remote.output
    files = sorted(p.name for p in (tmp_path / "local").iterdir())
    assert len(files) == 12 and sorted(p.name for p in (tmp_path / "ray").iterdir()) == files
    for name in files:
        assert (tmp_path / "ray" / name).read_bytes() == (tmp_path / "local" / name).read_bytes(), name
    # A broken case is reported with its reason; the others are written.
    (inputs / "broken_0000.nii.gz").write_bytes(b"not a nifti")
    again = CliRunner().invoke(app, ["predict", "-i", str(inputs), "-o", str(tmp_path / "ray2"), "-m", str(run), "--ray",
                                     c.address])
    assert again.exit_code == 1 and "broken_0000.nii.gz" in again.output
    assert len(list((tmp_path / "ray2").glob("*.nii.gz"))) == 4
