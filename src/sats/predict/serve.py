"""``sats serve``: a DICOM node that receives planning CTs and sends back the GTV.

The planning system or PACS sends a CT series (C-STORE) to this node's AE title; the
node predicts the GTV with the model it keeps loaded and writes an RTSTRUCT (or DICOM SEG)
that references the series and its frame of reference, then pushes it (C-STORE) to the
destination, as auto-contouring products in radiotherapy do.

Everything lives in the store folder ``DIR``, so that ``kill -9`` at any moment loses
nothing that was acknowledged and never sends a half-written object::

    incoming/<StudyUID>/<SeriesUID>/<SOPInstanceUID>.dcm   received instances, each written
                                                           atomically before its C-STORE response
    outgoing/<StudyUID>/<SeriesUID>/RS.dcm (or SEG.dcm)    the result, written atomically
    queue.sqlite                                           the job queue (SQLite, WAL)
    serve.log                                              the log (UIDs; patient IDs only at DEBUG)

A job is one series. Its states::

    receiving -> received -> predicting -> predicted -> sent   (with --send-to)
                                                     -> done   (without)
    any step -> failed, with a one-line reason

A series is ``received`` when the association that brought it is released, or when no
instance arrived for ``settle`` seconds (an aborted association, a sender that keeps
associations open). A restart puts ``predicting`` jobs back to ``received``: results are
only ever renamed into place complete, and a result that was written but not confirmed
sent is sent again (the same SOP Instance UID, so a receiver stores it once).
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from sats.data.io import atomic_path
from sats.geometry.volume import SatsError

log = logging.getLogger("sats.predict.serve")

STATES = ("receiving", "received", "predicting", "predicted", "sent", "done", "failed")
#: Status of a C-STORE response (PS3.4 Annex B): success, out of resources, cannot understand.
SUCCESS, OUT_OF_RESOURCES, CANNOT_UNDERSTAND = 0x0000, 0xA700, 0xC210

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    series_uid TEXT PRIMARY KEY,
    study_uid TEXT NOT NULL,
    state TEXT NOT NULL,
    reason TEXT,
    calling_ae TEXT,
    instances INTEGER NOT NULL DEFAULT 0,
    first_received REAL,
    last_received REAL,
    finished REAL,
    result TEXT,
    send_attempts INTEGER NOT NULL DEFAULT 0,
    next_send REAL NOT NULL DEFAULT 0,
    qa TEXT
)"""


@dataclass(frozen=True)
class Destination:
    """Where results go: ``AE@HOST:PORT``."""

    ae_title: str
    host: str
    port: int

    @classmethod
    def parse(cls, text: str) -> Destination:
        try:
            ae, rest = text.split("@", 1)
            host, port = rest.rsplit(":", 1)
            dest = cls(ae.strip(), host.strip(), int(port))
        except ValueError:
            raise SatsError(f"--send-to {text!r}: expected AE@HOST:PORT, e.g. TPS@10.0.0.5:104") from None
        if not dest.ae_title or len(dest.ae_title) > 16 or not dest.host or not 0 < dest.port < 65536:
            raise SatsError(f"--send-to {text!r}: AE title of 1-16 characters, a host and a port 1-65535")
        return dest

    def __str__(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}"


# --- the job queue ------------------------------------------------------------------------------


class JobQueue:
    """The durable queue in ``DIR/queue.sqlite``: one row per series. Thread-safe (one
    connection behind a lock); every change is one committed transaction."""

    def __init__(self, store: Path) -> None:
        self.store = Path(store)
        try:
            self.store.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(self.store / "queue.sqlite", check_same_thread=False, isolation_level=None,
                                       timeout=30)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")  # a committed state survives power loss
            self._db.execute(_SCHEMA)
            if "qa" not in {r[1] for r in self._db.execute("PRAGMA table_info(jobs)")}:  # a store from before the QA column
                self._db.execute("ALTER TABLE jobs ADD COLUMN qa TEXT")
        except (OSError, sqlite3.Error) as exc:
            raise SatsError(f"{self.store}: cannot open the job queue ({exc})") from None
        self._lock = threading.Lock()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def instance_received(self, study: str, series: str, calling_ae: str, new: bool) -> None:
        """Record one stored instance. More instances of a series already handled start it over."""
        now = time.time()
        with self._tx() as db:
            row = db.execute("SELECT state FROM jobs WHERE series_uid=?", (series,)).fetchone()
            if row is None:
                db.execute("INSERT INTO jobs (series_uid, study_uid, state, calling_ae, instances, first_received, "
                           "last_received) VALUES (?, ?, 'receiving', ?, ?, ?, ?)", (series, study, calling_ae, int(new), now, now))
            else:
                db.execute("UPDATE jobs SET state='receiving', reason=NULL, result=NULL, qa=NULL, send_attempts=0, next_send=0, "
                           "instances=instances+?, last_received=?, calling_ae=? WHERE series_uid=?",
                           (int(new), now, calling_ae, series))

    def series_released(self, series: list[str]) -> None:
        with self._tx() as db:
            db.executemany("UPDATE jobs SET state='received' WHERE series_uid=? AND state='receiving'", [(s,) for s in series])

    def claim_prediction(self, settle: float) -> tuple[str, str] | None:
        """The oldest complete series, moved to ``predicting``: ``(study, series)`` or None."""
        with self._tx() as db:
            row = db.execute("SELECT study_uid, series_uid FROM jobs WHERE state='received' OR "
                             "(state='receiving' AND last_received < ?) ORDER BY last_received LIMIT 1",
                             (time.time() - settle,)).fetchone()
            if row is not None:
                db.execute("UPDATE jobs SET state='predicting' WHERE series_uid=?", (row[1],))
            return row

    def claim_send(self) -> tuple[str, str, str, int] | None:
        """A predicted series whose next send is due: ``(study, series, result, attempts)``."""
        with self._tx() as db:
            return db.execute("SELECT study_uid, series_uid, result, send_attempts FROM jobs WHERE state='predicted' "
                              "AND next_send <= ? ORDER BY last_received LIMIT 1", (time.time(),)).fetchone()

    def set_state(self, series: str, state: str, expect: str, **fields) -> bool:
        """Compare-and-set: move ``series`` from ``expect`` to ``state`` (and set ``fields``);
        False when it was not in ``expect`` any more (new instances came in meanwhile)."""
        assert state in STATES and expect in STATES
        cols = "".join(f", {k}=?" for k in fields)
        with self._tx() as db:
            cur = db.execute(f"UPDATE jobs SET state=?{cols} WHERE series_uid=? AND state=?",
                             (state, *fields.values(), series, expect))
            return cur.rowcount == 1

    def recover(self) -> int:
        """After a restart: interrupted predictions run again. Returns how many."""
        with self._tx() as db:
            return db.execute("UPDATE jobs SET state='received' WHERE state='predicting'").rowcount

    def retry_failed(self) -> int:
        """``sats serve --retry``: failed jobs with a result are sent again, the others predicted again."""
        with self._tx() as db:
            n = db.execute("UPDATE jobs SET state='predicted', reason=NULL, send_attempts=0, next_send=0 "
                           "WHERE state='failed' AND result IS NOT NULL").rowcount
            return n + db.execute("UPDATE jobs SET state='received', reason=NULL WHERE state='failed'").rowcount

    def rows(self) -> list[dict]:
        with self._lock:
            cur = self._db.execute("SELECT * FROM jobs ORDER BY first_received")
            names = [d[0] for d in cur.description]
            return [dict(zip(names, r)) for r in cur.fetchall()]


# --- receiving ----------------------------------------------------------------------------------


def _safe_uid(uid: object, what: str) -> str:
    text = str(uid or "").strip()
    if not text or len(text) > 64 or not all(c.isdigit() or c == "." for c in text):
        raise ValueError(f"{what} {text[:70]!r} is not a DICOM UID")
    return text


class Receiver:
    """The Storage SCP's handlers: store each instance atomically, then acknowledge it."""

    def __init__(self, store: Path, queue: JobQueue) -> None:
        self.incoming = Path(store) / "incoming"
        self.queue = queue
        self._series_of: dict[int, set[str]] = {}  # association -> series it brought
        self._lock = threading.Lock()

    def on_store(self, event) -> int:
        calling = str(event.assoc.requestor.ae_title).strip()
        try:
            ds = event.dataset
            study = _safe_uid(ds.get("StudyInstanceUID"), "StudyInstanceUID")
            series = _safe_uid(ds.get("SeriesInstanceUID"), "SeriesInstanceUID")
            sop = _safe_uid(event.request.AffectedSOPInstanceUID, "SOPInstanceUID")
        except Exception as exc:  # anything a sender can put on the wire
            log.error("from %s: instance not stored, it cannot be read (%s)", calling, str(exc).splitlines()[0][:200])
            return CANNOT_UNDERSTAND
        target = self.incoming / study / series / f"{sop}.dcm"
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            new = not target.exists()
            with atomic_path(target, suffix=".dcm") as tmp, open(tmp, "wb") as fh:
                fh.write(event.encoded_dataset())
                fh.flush()
                os.fsync(fh.fileno())
            self.queue.instance_received(study, series, calling, new)
        except (OSError, sqlite3.Error) as exc:
            log.error("series %s: instance %s not stored (%s)", series, sop, exc)
            return OUT_OF_RESOURCES
        with self._lock:
            self._series_of.setdefault(id(event.assoc), set()).add(series)
        if log.isEnabledFor(logging.DEBUG):  # patient data only where the log level asks for it
            log.debug("series %s: instance %s from %s (patient ID %s)", series, sop, calling, ds.get("PatientID", "?"))
        return SUCCESS

    def on_released(self, event) -> None:
        with self._lock:
            series = sorted(self._series_of.pop(id(event.assoc), set()))
        if series:
            self.queue.series_released(series)
            for s in series:
                log.info("series %s: received (association released)", s)

    def on_aborted(self, event) -> None:
        with self._lock:  # its series complete by the settle time instead
            self._series_of.pop(id(event.assoc), None)

    def recover_orphans(self) -> int:
        """Instances on disk whose series the queue does not know (killed between the rename
        and the commit): queue them. Returns how many series."""
        known = {r["series_uid"] for r in self.queue.rows()}
        n = 0
        for series_dir in sorted(self.incoming.glob("*/*")) if self.incoming.exists() else []:
            if series_dir.name not in known and any(series_dir.glob("*.dcm")):
                self.queue.instance_received(series_dir.parent.name, series_dir.name, "?", True)
                n += 1
        return n


# --- predicting and sending ---------------------------------------------------------------------


@dataclass
class ServeOptions:
    """Settings of a node (see ``sats serve --help``)."""

    ae_title: str = "SATS"
    host: str = "0.0.0.0"
    port: int = 11112
    send_to: Destination | None = None
    fmt: str = "rtstruct"
    workers: int = 1
    allow: tuple[str, ...] = ()
    settle: float = 10.0
    send_tries: int = 5
    backoff: float = 2.0  # seconds before the 2nd try, doubled each time, at most 5 minutes
    device: str = "cpu"
    poll: float = 0.5


class Node:
    """A running node: the SCP, the prediction workers and the sender."""

    def __init__(self, run_dir: Path | list[Path], store: Path, options: ServeOptions) -> None:
        from sats.predict.inference import PredictOptions, load_model

        self.run = load_model(run_dir, options.device)  # one ensemble, shared by the workers; first: a bad RUN leaves no store
        self.store, self.opt = Path(store).resolve(), options
        self.queue = JobQueue(self.store)
        self.receiver = Receiver(self.store, self.queue)
        self.predict_options = PredictOptions(device=options.device, fmt=options.fmt)  # type: ignore[arg-type]
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._server = None

    # The same path as `sats predict --format rtstruct|seg` on one series folder. A case
    # flagged for review is sent all the same, as "GTVp (review)" with the reason in the
    # series description: the planning system shows that the series was contoured and must
    # be checked, where sending nothing would look like a node that is down.
    def predict_series(self, study: str, series: str) -> tuple[Path, str]:
        from sats.predict.inference import output_paths, predict_file

        folder = self.store / "incoming" / study / series
        out_dir = self.store / "outgoing" / study / series
        out_dir.mkdir(parents=True, exist_ok=True)
        paths = output_paths(out_dir / ("RS.dcm" if self.opt.fmt == "rtstruct" else "SEG.dcm"), "GTV", True, self.opt.fmt)
        t0 = time.time()
        pred, _ = predict_file(self.run, folder, paths, "GTV", self.predict_options)
        ml = float(pred.mask.array.sum()) * pred.mask.voxel_volume_ml
        log.info("series %s: %d slices read and predicted (%.1f ml GTV) in %.1f s -> %s", series, pred.mask.shape[0], ml,
                 time.time() - t0, paths["mask"].relative_to(self.store))
        verdict = pred.qa.get("flag", "")
        if pred.flagged:
            log.warning("series %s: flagged for review: %s", series, pred.qa["reason"])
        return paths["mask"], verdict

    def _predict_loop(self) -> None:
        while not self._stop.is_set():
            job = self.queue.claim_prediction(self.opt.settle)
            if job is None:
                self._stop.wait(self.opt.poll)
                continue
            study, series = job
            log.info("series %s (study %s): predicting", series, study)
            try:
                result, verdict = self.predict_series(study, series)
            except Exception as exc:  # one bad series never stops the node
                reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                if not isinstance(exc, SatsError):
                    log.exception("series %s: unexpected error", series)
                self.queue.set_state(series, "failed", "predicting", reason=reason[:500], finished=time.time())
                log.error("series %s: failed: %s", series, reason)
                continue
            nxt = "predicted" if self.opt.send_to else "done"
            if not self.queue.set_state(series, nxt, "predicting", result=str(result), finished=time.time(), qa=verdict):
                log.info("series %s: more instances arrived meanwhile; predicting it again", series)

    def _send_loop(self) -> None:
        while not self._stop.is_set():
            job = self.queue.claim_send()
            if job is None:
                self._stop.wait(self.opt.poll)
                continue
            study, series, result, attempts = job
            try:
                send_file(Path(result), self.opt.send_to, self.opt.ae_title)  # type: ignore[arg-type]
            except SatsError as exc:
                attempts += 1
                if attempts >= self.opt.send_tries:
                    self.queue.set_state(series, "failed", "predicted", send_attempts=attempts,
                                         reason=f"sending to {self.opt.send_to} failed after {attempts} tries: {exc}")
                    log.error("series %s: sending to %s failed after %d tries: %s", series, self.opt.send_to, attempts, exc)
                else:
                    wait = min(self.opt.backoff * 2 ** (attempts - 1), 300.0)
                    self.queue.set_state(series, "predicted", "predicted", send_attempts=attempts, next_send=time.time() + wait)
                    log.warning("series %s: sending to %s failed (%s); try %d of %d in %.0f s", series, self.opt.send_to,
                                exc, attempts + 1, self.opt.send_tries, wait)
                continue
            self.queue.set_state(series, "sent", "predicted", send_attempts=attempts + 1)
            log.info("series %s: sent to %s", series, self.opt.send_to)

    def start(self) -> None:
        from pynetdicom import AE, StoragePresentationContexts, evt
        from pynetdicom.sop_class import Verification

        n = self.queue.recover()
        orphans = self.receiver.recover_orphans()
        if n or orphans:
            log.info("restart: %d interrupted prediction(s) and %d unrecorded series queued again", n, orphans)
        ae = AE(ae_title=self.opt.ae_title)
        # Every storage class is accepted, so that a series that is not a CT is stored and
        # reported as a failed job instead of being refused without a word.
        ae.supported_contexts = StoragePresentationContexts
        ae.add_supported_context(Verification)
        if self.opt.allow:
            ae.require_calling_aet = list(self.opt.allow)
        handlers = [(evt.EVT_C_STORE, self.receiver.on_store), (evt.EVT_C_ECHO, lambda event: SUCCESS),
                    (evt.EVT_RELEASED, self.receiver.on_released), (evt.EVT_ABORTED, self.receiver.on_aborted),
                    (evt.EVT_REJECTED, lambda event: log.warning("association from %s rejected",
                                                                 str(event.assoc.requestor.ae_title).strip()))]
        try:
            self._server = ae.start_server((self.opt.host, self.opt.port), block=False, evt_handlers=handlers)
        except OSError as exc:
            raise SatsError(f"cannot listen on {self.opt.host}:{self.opt.port} ({exc.strerror})") from None
        loops = [self._predict_loop] * max(1, self.opt.workers) + ([self._send_loop] if self.opt.send_to else [])
        for i, loop in enumerate(loops):
            t = threading.Thread(target=loop, name=f"sats-serve-{i}", daemon=True)
            t.start()
            self._threads.append(t)
        log.info("listening as %s on %s:%d; store %s%s", self.opt.ae_title, self.opt.host, self.opt.port, self.store,
                 f"; results to {self.opt.send_to}" if self.opt.send_to else "")

    def stop(self) -> None:
        """Stop accepting, let the current prediction finish, close the queue."""
        if self._server is not None:
            self._server.shutdown()
        self._stop.set()
        for t in self._threads:
            t.join()
        self.queue.close()


def send_file(path: Path, dest: Destination, calling_ae: str, timeout: float = 30.0) -> None:
    """C-STORE one file to ``dest``; SatsError with the reason when it did not arrive."""
    import pydicom
    from pynetdicom import AE

    ds = pydicom.dcmread(path)
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    assoc = ae.associate(dest.host, dest.port, ae_title=dest.ae_title)
    if not assoc.is_established:
        raise SatsError("no association (destination down, or it refused us)")
    try:
        status = assoc.send_c_store(ds)
    finally:
        assoc.release()
    if not status or int(status.Status) != SUCCESS:
        raise SatsError(f"C-STORE status {hex(int(status.Status)) if status else 'none (connection lost)'}")


def serve(run_dir: Path | list[Path], store: Path, options: ServeOptions, log_level: str = "INFO") -> None:
    """Run a node until SIGINT or SIGTERM."""
    import signal

    node = Node(run_dir, store, options)
    setup_logging(node.store, log_level)
    node.start()
    stopped = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stopped.set())
    stopped.wait()
    log.info("stopping")
    node.stop()


def setup_logging(store: Path, level: str = "INFO") -> None:
    """Log lines to stderr and ``DIR/serve.log``: time, level, message (which names UIDs)."""
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(message)s")
    root = logging.getLogger("sats.predict.serve")
    root.setLevel(level.upper())
    root.handlers.clear()
    for handler in (logging.StreamHandler(), logging.FileHandler(Path(store) / "serve.log")):
        handler.setFormatter(fmt)
        root.addHandler(handler)
    logging.getLogger("pynetdicom").setLevel(logging.WARNING if level.upper() != "DEBUG" else logging.INFO)


def status_table(store: Path):
    """The queue as a rich Table (``sats serve --status DIR``)."""
    from rich.table import Table

    if not (Path(store) / "queue.sqlite").exists():
        raise SatsError(f"{store}: no job queue here (not a `sats serve --store` folder)")
    queue = JobQueue(store)
    rows = queue.rows()
    queue.close()
    table = Table(title=f"sats serve: {store} ({len(rows)} series)")
    for col in ("series", "state", "QA", "instances", "from", "received", "result / reason"):
        table.add_column(col)
    for r in rows:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r["last_received"])) if r["last_received"] else ""
        detail = r["reason"] or (str(Path(r["result"]).relative_to(Path(store).resolve())) if r["result"] else "")
        qa = r.get("qa") or ""
        table.add_row(r["series_uid"], r["state"], f"[bold red]{qa}[/]" if qa == "review" else qa, str(r["instances"]),
                      r["calling_ae"] or "", when, detail)
    return table
