"""Past one machine: a study's runs and a folder's predictions as Ray tasks and actors.

``sats ablation ... --ray ADDRESS`` makes each (arm, seed) run a Ray task: one GPU when the
study trains on CUDA, else ``--ray-cpus`` cores. ``sats predict -i FOLDER ... --ray ADDRESS``
starts ``--ray-workers`` actors that each hold the loaded model and predicts the cases on
them. Both run the same functions as the local commands
(:func:`sats.evaluation.ablation.train_and_score`, :func:`sats.predict.inference.predict_file`),
so results are the same; only where they run changes. Ray is imported only here, and only
with ``--ray``.

**Storage.** Every node reads the dataset and writes the study folder (or the output
folder) under the same path: shared storage (NFS, a cluster file system, one machine's
disk). The driver writes a token file there first; a task or actor that cannot read it
stops with an error naming its node, before any work.

**Failures.** A run whose worker dies (the process, or its whole node) is retried by Ray on
another worker (``max_retries``); it finds the run's ``checkpoint.pt`` and resumes from
the last finished epoch, and a run whose model is there is never trained again. Each task
holds the run's file lock, as a local ``sats ablation`` does, so a local process and the
cluster can share a study. A case that fails in a folder prediction is reported with its
reason and the others go on, as locally.

One machine needs no Ray: two local ``sats ablation`` processes already share a study
through the runs' file locks. Ray's local mode is deprecated, and a scheduler that only
stands in for a lock file adds a dependency and a start-up cost for nothing.
"""

from __future__ import annotations

import os
import socket
import time
import uuid
from dataclasses import asdict
from pathlib import Path

from sats.geometry.volume import SatsError

__all__ = ["connect", "predict_on_ray", "run_study_on_ray"]

#: Tries of a run (or a prediction actor's case) after its worker died.
MAX_RETRIES = 3
TOKEN = ".sats-ray-token"


def _host_port(address: str) -> tuple[str, int] | None:
    """``(host, port)`` of a ``host:port`` or ``ray://host:port`` address; None for auto/local."""
    rest = address.split("://", 1)[-1]
    host, sep, port = rest.rpartition(":")
    if not sep or not port.isdigit():
        return None
    return host.strip("[]"), int(port)


def connect(address: str, timeout_s: float = 10.0):
    """``ray.init`` at ``address`` (``auto``: the cluster this machine belongs to; ``local``:
    a new one-machine cluster; ``ray://host:port`` or ``host:port``); the ``ray`` module.

    A ``host:port`` that does not answer within ``timeout_s`` fails at once (Ray itself
    retries for minutes). A head on a loopback address is a one-machine cluster: this
    driver then reports 127.0.0.1 too (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``, read when
    Ray is imported); without it Ray would look for this driver's node at the machine's
    outward address and wait for it.
    """
    hp = _host_port(address)
    if hp is not None:
        try:
            socket.create_connection(hp, timeout=timeout_s).close()
        except OSError as exc:
            raise SatsError(f"--ray {address}: nothing answers at {hp[0]}:{hp[1]} ({exc})") from None
        if hp[0] in ("localhost", "::1") or hp[0].startswith("127."):
            os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    try:
        import ray
    except ImportError:
        raise SatsError("--ray needs Ray: pip install 'sats[ray]'") from None
    if not ray.is_initialized():
        try:
            ray.init(address=None if address == "local" else address, log_to_driver=False,
                     runtime_env={"env_vars": {"PYTHONUNBUFFERED": "1"}})
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise SatsError(f"--ray {address}: cannot connect ({str(exc).splitlines()[0]})") from None
    return ray


def _write_token(folder: Path) -> str:
    """A fresh token in ``folder`` that every worker must read back (shared storage)."""
    token = uuid.uuid4().hex
    (Path(folder) / TOKEN).write_text(token)
    return token


def check_shared(folder: str, token: str) -> None:
    """Raise when this worker does not see ``folder`` as the driver wrote it."""
    try:
        seen = (Path(folder) / TOKEN).read_text()
    except OSError:
        seen = None
    if seen != token:
        raise SatsError(f"node {socket.gethostname()} cannot see {folder} as the driver does: a Ray study or "
                        f"folder prediction needs storage that every node mounts under the same path")


def _threads(cpus: int) -> None:
    import torch

    torch.set_num_threads(max(1, int(cpus)))


def _study_task(settings: dict, out: str, arm: str, seed: int, device: str, cpus: int, token: str) -> dict:
    """One run on a worker: the same steps as a local ``sats ablation`` takes for it."""
    from rich.console import Console

    from sats.evaluation.ablation import AblationSettings, train_and_score, run_dir
    from sats.model.run import claim

    check_shared(out, token)
    _threads(cpus)
    console = Console(quiet=True)  # the driver reports each run; the worker says nothing
    t0 = time.time()
    run = run_dir(Path(out), arm, seed)
    run.mkdir(parents=True, exist_ok=True)
    with claim(run / ".ablation.lock", wait=True):
        _record_attempt(run)
        train_and_score(AblationSettings(**settings), Path(out), arm, seed, console, device)
    return {"arm": arm, "seed": seed, "node": socket.gethostname(), "pid": os.getpid(), "seconds": time.time() - t0}


def _record_attempt(run: Path) -> None:
    """Append where this attempt at the run works, and the epoch it resumes after, to
    ``run/ray_attempts.jsonl`` (a retried run shows its history there)."""
    import json

    import ray

    from sats.model.run import load_state

    ckpt = run / "checkpoint.pt"
    epoch = None
    if ckpt.exists() and not (run / "model.pt").exists():
        epoch = int(load_state(ckpt).get("epoch", -1)) + 1
    line = {"node": ray.get_runtime_context().get_node_id(), "host": socket.gethostname(), "pid": os.getpid(),
            "started": time.time(), "epochs_done_before": epoch}
    with open(run / "ray_attempts.jsonl", "a") as fh:
        fh.write(json.dumps(line) + "\n")


def run_study_on_ray(settings, out: Path, address: str, device: str, cpus: int = 1, console=None) -> dict:
    """``sats ablation --ray``: every (arm, seed) not finished yet as a task; the summaries
    rewritten as each run finishes, as locally. Returns the study's statistics."""
    from rich.console import Console

    from sats.evaluation.ablation import open_study, run_dir, summarize_rows, study_rows, write_study_outputs

    console = console or Console()
    out = Path(out).resolve()
    runs = open_study(settings, out)
    ray = connect(address)
    token = _write_token(out)
    cuda = str(device).startswith("cuda")
    task = ray.remote(_study_task).options(num_cpus=0 if cuda else cpus, num_gpus=1 if cuda else 0,
                                           max_retries=MAX_RETRIES, retry_exceptions=False)
    todo = [(a, s) for a, s in runs if not (run_dir(out, a, s) / "metrics.csv").exists()
            or (settings.test_dataset and not (run_dir(out, a, s) / "metrics_cross.csv").exists())]
    console.print(f"{len(runs)} runs, {len(runs) - len(todo)} already scored; {len(todo)} as Ray tasks on "
                  f"{len(ray.nodes())} node(s), {'one GPU' if cuda else f'{cpus} CPU(s)'} each", highlight=False)
    pending = {task.remote(asdict(settings), str(out), a, s, device, cpus, token): (a, s) for a, s in todo}
    done = 0
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1)
        arm, seed = pending.pop(ready[0])
        try:
            info = ray.get(ready[0])
        except ray.exceptions.RayError as exc:
            cause = getattr(exc, "cause", None)
            raise SatsError(f"{arm}-s{seed}: {cause if isinstance(cause, SatsError) else str(exc).splitlines()[0]}") from None
        done += 1
        summary = write_study_outputs(settings, out)
        console.print(f"[bold]run {done}/{len(todo)}[/] {arm}-s{seed} on {info['node']}: {info['seconds'] / 60:.1f} min; "
                      f"test DSC {summary['variants'][arm]['dsc']['mean']:.2f} (seed-averaged so far)", highlight=False)
    if not todo:
        write_study_outputs(settings, out)
    return summarize_rows(study_rows(out))


class _Predictor:
    """A Ray actor holding one loaded model (ensemble); predicts one input file per call."""

    def __init__(self, models: list[str], options: dict, folder: str, token: str, cpus: int) -> None:
        from sats.predict.inference import PredictOptions, load_model

        check_shared(folder, token)
        _threads(cpus)
        self.options = PredictOptions(**options)
        self.run = load_model([Path(m) for m in models], self.options.device)

    def predict(self, cid: str, path: str, output: str) -> dict:
        """{"case", "ok", "message"}: the log line, or the error's one line."""
        from sats.geometry.volume import about
        from sats.predict.inference import output_paths, predict_file

        paths = output_paths(Path(output), cid, False, self.options.fmt)
        try:
            with about(Path(path)):
                pred, note = predict_file(self.run, Path(path), paths, cid, self.options)
        except SatsError as exc:
            return {"case": cid, "ok": False, "message": str(exc)}
        ml = float(pred.mask.array.sum()) * pred.mask.voxel_volume_ml
        verdict = f", {pred.qa['flag']}" if pred.qa else ""
        return {"case": cid, "ok": True, "message": f"{cid}: {ml:.1f} ml GTV{verdict}, {pred.seconds:.1f} s -> {paths['mask']}{note}"}


#: Seconds an actor may take to be placed and to load the model before it is given up.
ACTOR_START_S = 300.0


def _ready_actors(ray, pool: list, console) -> list:
    """The actors of ``pool`` that were placed and loaded the model within :data:`ACTOR_START_S`
    (the cluster may have room for fewer than asked); an error when none was."""
    refs = {a.__ray_ready__.remote(): a for a in pool}
    ready, late = ray.wait(list(refs), num_returns=len(refs), timeout=ACTOR_START_S)
    actors = []
    for ref in ready:
        try:
            ray.get(ref)
            actors.append(refs[ref])
        except ray.exceptions.RayError as exc:
            cause = getattr(exc, "cause", None)
            if isinstance(cause, SatsError):
                raise cause from None
            console.print(f"[yellow]a prediction actor failed to start:[/] {str(exc).splitlines()[0]}", highlight=False)
    if not actors:
        raise SatsError(f"no Ray actor could start within {ACTOR_START_S:.0f} s (is there a node with the resources asked for?)")
    if late:
        console.print(f"[yellow]{len(late)} of {len(pool)} actors found no room on the cluster; going on with {len(actors)}[/]",
                      highlight=False)
    return actors


def predict_on_ray(input_path: Path, output: Path, models: list[Path], options, address: str, workers: int = 2,
                   cpus: int = 1, console=None) -> tuple[int, int]:
    """``sats predict -i FOLDER --ray``: the cases spread over ``workers`` actors, each with
    the model loaded once; returns (done, failed) like :func:`sats.predict.inference.predict_paths`."""
    from rich.console import Console

    from sats.data.io import collect_inputs
    from sats.predict.inference import check_outputs
    from sats.progress import progress_bar

    console = console or Console()
    items, single = collect_inputs(input_path)
    if single:
        raise SatsError(f"{input_path}: --ray predicts a folder of CTs; for one CT run `sats predict` without it")
    check_outputs(input_path, output, items, single, options)
    output = Path(output).resolve()
    try:
        output.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise SatsError(f"{output}: cannot create output folder ({exc.strerror})") from None
    ray = connect(address)
    token = _write_token(output)
    cuda = str(options.device).startswith("cuda")
    actor = ray.remote(_Predictor).options(num_cpus=0 if cuda else cpus, num_gpus=1 if cuda else 0,
                                           max_restarts=MAX_RETRIES, max_task_retries=MAX_RETRIES)
    pool = [actor.remote([str(Path(m).resolve()) for m in models], asdict(options), str(output), token, cpus)
            for _ in range(max(1, min(workers, len(items))))]
    try:
        idle = _ready_actors(ray, pool, console)
        todo = list(items)
        pending: dict = {}
        done = failed = 0
        with progress_bar(console) as progress:
            bar = progress.add_task(f"cases on {len(idle)} Ray actor(s)", total=len(items))
            while todo or pending:
                while todo and idle:  # each actor one case at a time: a fast one takes more
                    cid, path = todo.pop(0)
                    a = idle.pop()
                    pending[a.predict.remote(cid, str(Path(path).resolve()), str(output))] = (cid, a)
                ready, _ = ray.wait(list(pending), num_returns=1)
                cid, a = pending.pop(ready[0])
                idle.append(a)
                try:
                    result = ray.get(ready[0])
                except ray.exceptions.RayError as exc:
                    result = {"case": cid, "ok": False, "message": f"{cid}: {str(exc).splitlines()[0]}"}
                if result["ok"]:
                    done += 1
                    progress.console.print(result["message"], highlight=False)
                else:
                    failed += 1
                    progress.console.print(f"[bold red]error:[/] {result['message']}", highlight=False, soft_wrap=True)
                progress.advance(bar)
    finally:
        (output / TOKEN).unlink(missing_ok=True)
        for a in pool:
            ray.kill(a)
    return done, failed
