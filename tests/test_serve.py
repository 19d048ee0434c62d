"""`sats serve`, the DICOM node: a real series over real DICOM networking on 127.0.0.1.

The node runs as a subprocess (`python -m sats serve`), as in a department; pynetdicom's
storage SCU stands in for the PACS and a storage SCP for the planning system.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pynetdicom import AE, StoragePresentationContexts, evt  # a declared dependency: missing, it fails
from pynetdicom.sop_class import CTImageStorage, RTStructureSetStorage, Verification

from conftest import REPO


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PlanningSystem:
    """A storage SCP on 127.0.0.1 that keeps what it receives (the TPS or PACS)."""

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.received: list[pydicom.Dataset] = []
        # hold_next: the next C-STORE is kept (received) but its response waits until `release`
        # is set; `arrived` says when it is in, so that a test can kill the sender meanwhile.
        self.hold_next, self.arrived, self.release = False, threading.Event(), threading.Event()
        ae = AE(ae_title="TPS")
        ae.supported_contexts = StoragePresentationContexts
        self.server = ae.start_server(("127.0.0.1", self.port), block=False,
                                      evt_handlers=[(evt.EVT_C_STORE, self._store)])

    def _store(self, event) -> int:
        ds = event.dataset
        ds.file_meta = event.file_meta
        self.received.append(ds)
        if self.hold_next:
            self.hold_next = False
            self.arrived.set()
            self.release.wait(120)
        return 0x0000

    def wait_for(self, n: int, timeout: float) -> list[pydicom.Dataset]:
        deadline = time.time() + timeout
        while len(self.received) < n and time.time() < deadline:
            time.sleep(0.2)
        return self.received

    def stop(self) -> None:
        self.release.set()
        self.server.shutdown()


def send_series(files: list[Path], port: int, calling: str = "PACS") -> list[int]:
    """C-STORE the files in one association; the status of each (-1: no response, the
    association was lost)."""
    ae = AE(ae_title=calling)
    for cx in (CTImageStorage, RTStructureSetStorage):
        ae.add_requested_context(cx)
    assoc = ae.associate("127.0.0.1", port, ae_title="SATS")
    assert assoc.is_established, "the node refused the association"
    statuses = []
    for f in files:
        rsp = assoc.send_c_store(pydicom.dcmread(f)) if assoc.is_established else None
        statuses.append(int(rsp.Status) if rsp is not None and "Status" in rsp else -1)
    if assoc.is_established:
        assoc.release()
    return statuses


def echo(port: int, calling: str = "PACS") -> bool:
    ae = AE(ae_title=calling)
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port, ae_title="SATS")
    if not assoc.is_established:
        return False
    ok = int(assoc.send_c_echo().Status) == 0
    assoc.release()
    return ok


class Node:
    """`sats serve` as a subprocess."""

    def __init__(self, run: Path, store: Path, *args: str, caller: str = "PACS") -> None:
        self.port, self.caller = free_port(), caller  # caller: an AE title the node lets in
        self.cmd = [sys.executable, "-m", "sats", "serve", "-m", str(run), "--store", str(store), "--host", "127.0.0.1",
                    "--port", str(self.port), "--settle", "2", "--device", "cpu", *args]
        self.store = store
        self.start()

    def start(self) -> None:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        self.log = open(self.store.parent / f"{self.store.name}.stderr", "ab")
        self.proc = subprocess.Popen(self.cmd, cwd=REPO, env=env, stdout=self.log, stderr=self.log, start_new_session=True)
        deadline = time.time() + 120
        while time.time() < deadline:
            assert self.proc.poll() is None, self.output()
            try:
                if echo(self.port, self.caller):
                    return
            except Exception:
                pass
            time.sleep(0.3)
        raise AssertionError("the node did not answer C-ECHO: " + self.output())

    def output(self) -> str:
        return (self.store.parent / f"{self.store.name}.stderr").read_text(errors="replace")[-3000:]

    def kill(self) -> None:
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        self.log.close()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(60)
        self.log.close()


def jobs(store: Path) -> list[dict]:
    from sats.predict.serve import JobQueue

    q = JobQueue(store)
    try:
        return q.rows()
    finally:
        q.close()


def wait_state(store: Path, state: str, timeout: float, n: int = 1) -> list[dict]:
    deadline = time.time() + timeout
    while time.time() < deadline:
        rows = jobs(store) if (store / "queue.sqlite").exists() else []
        if sum(r["state"] == state for r in rows) >= n:
            return rows
        time.sleep(0.3)
    raise AssertionError(f"no job reached {state!r} in {timeout} s: {rows}")


def wait_job(store: Path, series: str, state: str, timeout: float) -> dict:
    """The job of ``series`` once it is in ``state``."""
    deadline, row = time.time() + timeout, None
    while time.time() < deadline:
        rows = jobs(store) if (store / "queue.sqlite").exists() else []
        row = next((r for r in rows if r["series_uid"] == series), None)
        if row is not None and row["state"] == state:
            return row
        time.sleep(0.2)
    raise AssertionError(f"series {series} did not reach {state!r} in {timeout} s: {row}")


@pytest.fixture(scope="module")
def lung_run(tiny_trained_run, tmp_path_factory):
    """A RUN whose model marks about 0.5 % of the 4D-Lung CT (a tiny trained model, calibrated)."""
    from conftest import _shared, predicting_run

    from sats.data.dicom import read_dicom_series

    ct = read_dicom_series(_shared("dicom/4d-lung") / "ct")
    return predicting_run(tiny_trained_run[0], ct, tmp_path_factory.mktemp("serve") / "run", fraction=0.005)


def _ct_files(lung_dicom: Path) -> list[Path]:
    return sorted((lung_dicom / "ct").glob("*.dcm"))


def test_a_series_sent_to_the_node_comes_back_as_the_rtstruct_of_sats_predict(lung_dicom, lung_run, tmp_path):
    from sats.predict.export import read_rtstruct_roi
    from sats.predict.inference import PredictOptions, predict_paths

    tps = PlanningSystem()
    node = Node(lung_run, tmp_path / "store", "--send-to", f"TPS@127.0.0.1:{tps.port}", "--allow", "PACS,OTHER")
    try:
        files = _ct_files(lung_dicom)
        assert send_series(files, node.port) == [0] * len(files)
        got = tps.wait_for(1, 180)
        assert len(got) == 1, node.output()
        rs = got[0]
        ct0 = pydicom.dcmread(files[0], stop_before_pixels=True)
        assert rs.Modality == "RTSTRUCT" and rs.StudyInstanceUID == ct0.StudyInstanceUID
        assert rs.PatientID == ct0.PatientID and rs.FrameOfReferenceUID == ct0.FrameOfReferenceUID
        ref = rs.ReferencedFrameOfReferenceSequence[0]
        assert ref.FrameOfReferenceUID == ct0.FrameOfReferenceUID
        series = ref.RTReferencedStudySequence[0].RTReferencedSeriesSequence[0]
        assert series.SeriesInstanceUID == ct0.SeriesInstanceUID and len(series.ContourImageSequence) == len(files)
        # The same mask as `sats predict --format rtstruct` on the same series.
        rs.save_as(tmp_path / "from_node.dcm", enforce_file_format=True)
        predict_paths(lung_dicom / "ct", tmp_path / "RS.dcm", lung_run, PredictOptions(fmt="rtstruct"))
        theirs = read_rtstruct_roi(tmp_path / "from_node.dcm", lung_dicom / "ct", rs.StructureSetROISequence[0].ROIName)
        ours = read_rtstruct_roi(tmp_path / "RS.dcm", lung_dicom / "ct", rs.StructureSetROISequence[0].ROIName)
        assert ours.array.any() and np.array_equal(theirs.array, ours.array)
        rows = wait_state(tmp_path / "store", "sent", 30)
        assert rows[0]["instances"] == len(files) and rows[0]["calling_ae"] == "PACS"
        # Every instance is on disk, by UID; the log names UIDs, not the patient.
        stored = list((tmp_path / "store" / "incoming" / ct0.StudyInstanceUID / ct0.SeriesInstanceUID).glob("*.dcm"))
        assert len(stored) == len(files)
        log = (tmp_path / "store" / "serve.log").read_text()
        assert ct0.SeriesInstanceUID in log and str(ct0.PatientName) not in log
        # A caller not in --allow is rejected at association.
        ae = AE(ae_title="INTRUDER")
        ae.add_requested_context(Verification)
        assert not ae.associate("127.0.0.1", node.port, ae_title="SATS").is_established
    finally:
        node.stop()
        tps.stop()
    status = subprocess.run([sys.executable, "-m", "sats", "serve", "--status", str(tmp_path / "store")], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert status.returncode == 0 and "sent" in status.stdout, status.stdout + status.stderr


def test_a_destination_that_is_down_fails_the_job_until_retry(lung_dicom, lung_run, tmp_path):
    port = free_port()  # nobody listens here yet
    node = Node(lung_run, tmp_path / "store", "--send-to", f"TPS@127.0.0.1:{port}", "--send-tries", "2")
    tps = None
    try:
        send_series(_ct_files(lung_dicom), node.port)
        rows = wait_state(tmp_path / "store", "failed", 240)
        assert "failed after 2 tries" in rows[0]["reason"], rows
        tps = PlanningSystem(port)
        retry = subprocess.run([sys.executable, "-m", "sats", "serve", "--retry", str(tmp_path / "store")], cwd=REPO,
                               capture_output=True, text=True, timeout=120)
        assert retry.returncode == 0 and "1 failed job" in retry.stdout
        assert len(tps.wait_for(1, 60)) == 1, node.output()
        wait_state(tmp_path / "store", "sent", 30)
    finally:
        node.stop()
        if tps:
            tps.stop()


def test_a_non_ct_or_corrupted_series_fails_with_its_reason_and_the_next_is_served(lung_dicom, lung_run, tmp_path):
    node = Node(lung_run, tmp_path / "store", "--format", "seg")  # and DICOM SEG instead of RTSTRUCT
    try:
        rtstruct = pydicom.dcmread(lung_dicom / "rtstruct" / "1-1.dcm", stop_before_pixels=True)
        assert send_series([lung_dicom / "rtstruct" / "1-1.dcm"], node.port) == [0]
        rows = wait_state(tmp_path / "store", "failed", 60)
        # The reason says that the series holds no CT, what it holds instead, and which series it is.
        reason = rows[0]["reason"]
        assert re.search(r"\bnot? CT\b", reason) and rtstruct.Modality in reason, rows
        assert rtstruct.SeriesInstanceUID in reason, rows
        # A CT series with a corrupted instance (its pixel data cut short) fails too.
        from pydicom.uid import generate_uid

        broken = tmp_path / "broken"
        broken.mkdir()
        uid = generate_uid()
        for i, f in enumerate(_ct_files(lung_dicom)[:20]):
            ds = pydicom.dcmread(f)
            ds.SeriesInstanceUID, ds.SOPInstanceUID = uid, generate_uid()
            if i == 7:
                ds.PixelData = ds.PixelData[: len(ds.PixelData) // 2]
                cut_sop, cut_bytes = ds.SOPInstanceUID, len(ds.PixelData)
            ds.save_as(broken / f"{i:03d}.dcm")
        send_series(sorted(broken.glob("*.dcm")), node.port)
        rows = wait_state(tmp_path / "store", "failed", 60, n=2)
        (bad,) = [r for r in rows if r["series_uid"] == uid]
        # The reason names the damaged instance (its file is named by its SOP Instance UID) and
        # the problem: pixel data shorter than Rows x Columns needs, by how many bytes it has.
        assert cut_sop in bad["reason"] and "pixel data" in bad["reason"].lower(), rows
        assert re.search(rf"\b{cut_bytes}\b", bad["reason"]), rows
        send_series(_ct_files(lung_dicom), node.port)
        rows = wait_state(tmp_path / "store", "done", 180)
        done = [r for r in rows if r["state"] == "done"][0]
        seg = pydicom.dcmread(done["result"])
        assert Path(done["result"]).name == "SEG.dcm" and seg.Modality == "SEG"
        assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == done["series_uid"]
    finally:
        node.stop()


def test_sigkill_during_prediction_loses_nothing_and_sends_once(lung_dicom, lung_run, tmp_path):
    """kill -9 during reception, during prediction and while the result is in flight: every
    acknowledged instance is on disk, complete; an instance on disk that the queue never
    recorded is queued on restart; the result reaches the destination as one SOP instance."""
    from pydicom.uid import generate_uid

    tps = PlanningSystem()
    store = tmp_path / "store"
    node = Node(lung_run, store, "--send-to", f"TPS@127.0.0.1:{tps.port}")
    try:
        files = _ct_files(lung_dicom)
        ct = {ds.SOPInstanceUID: ds for ds in map(pydicom.dcmread, files)}
        ct0 = next(iter(ct.values()))
        study, series = ct0.StudyInstanceUID, ct0.SeriesInstanceUID
        # 1. Killed during reception: 40 instances acknowledged, the node dies.
        ae = AE(ae_title="PACS")
        ae.add_requested_context(CTImageStorage)
        assoc = ae.associate("127.0.0.1", node.port, ae_title="SATS")
        acked = []
        for f in files[:40]:
            ds = pydicom.dcmread(f)
            assert int(assoc.send_c_store(ds).Status) == 0
            acked.append(ds.SOPInstanceUID)
        node.kill()
        assoc.abort()
        # Every acknowledged instance is on disk, complete, and recorded in the queue; no temp files.
        stored = sorted((store / "incoming" / study / series).glob("*.dcm"))
        assert sorted(p.stem for p in stored) == sorted(acked), node.output()
        for path in stored:
            ds = pydicom.dcmread(path)
            assert ds.SOPInstanceUID == path.stem and ds.PixelData == ct[path.stem].PixelData
        assert not list(store.rglob(".*.tmp*"))
        (row,) = jobs(store)
        assert row["series_uid"] == series and row["instances"] == len(acked) and row["state"] == "receiving"
        # An instance renamed into place whose queue insert the kill prevented (its series unknown
        # to the queue): a restart must queue it. One slice cannot be predicted, so it fails.
        orphan = pydicom.dcmread(files[50])
        orphan.SeriesInstanceUID, orphan.SOPInstanceUID = generate_uid(), generate_uid()
        orphan_dir = store / "incoming" / study / orphan.SeriesInstanceUID
        orphan_dir.mkdir(parents=True)
        orphan.save_as(orphan_dir / f"{orphan.SOPInstanceUID}.dcm", enforce_file_format=True)
        # 2. Restarted; the PACS sends the whole series again; killed during its prediction.
        node.start()
        assert send_series(files, node.port) == [0] * len(files), node.output()
        wait_job(store, series, "predicting", 120)
        node.kill()
        for f in (store / "outgoing").rglob("*.dcm"):  # nothing half-written
            pydicom.dcmread(f)
        assert not tps.received and not list(store.rglob(".*.tmp*"))
        # 3. Restarted: predicted again and sent; killed after the destination has the result
        # but before the node has its C-STORE response, so before it can commit `sent`.
        tps.hold_next = True
        node.start()
        assert tps.arrived.wait(240), node.output()
        rows = {r["series_uid"]: r for r in jobs(store)}
        assert rows[series]["state"] == "predicted", rows  # not confirmed, so not `sent`
        node.kill()
        tps.release.set()
        rs_uid = pydicom.dcmread(rows[series]["result"], stop_before_pixels=True).SOPInstanceUID
        # 4. Restarted: the unconfirmed result is sent again, the same SOP instance.
        node.start()
        wait_job(store, series, "sent", 120)
        time.sleep(2)
        # Stored once at the DICOM level: both deliveries (the unconfirmed one and the resend)
        # carry the one SOP Instance UID of the result on disk, so the receiver keeps one instance.
        assert [ds.SOPInstanceUID for ds in tps.received] == [rs_uid, rs_uid], node.output()
        assert tps.received[0].Modality == "RTSTRUCT"
        rows = {r["series_uid"]: r for r in jobs(store)}
        assert set(rows) == {series, orphan.SeriesInstanceUID} and rows[series]["state"] == "sent", rows
        bad = rows[orphan.SeriesInstanceUID]
        assert bad["study_uid"] == study and bad["instances"] == 1 and bad["state"] == "failed", rows
        stored = list((store / "incoming" / study / series).glob("*.dcm"))
        assert len(stored) == len(files) and not list(store.rglob(".*.tmp*"))
    finally:
        node.stop()
        tps.stop()


def _orthanc() -> str:
    import shutil

    tool = shutil.which("Orthanc") or shutil.which("Orthanc", path="/usr/sbin:/usr/local/sbin")
    if tool is None:
        if os.environ.get("SATS_REQUIRE_DICOM_TOOLS") == "1":
            pytest.fail("Orthanc (Debian package orthanc) is missing and SATS_REQUIRE_DICOM_TOOLS=1")
        pytest.skip("Orthanc (Debian package orthanc) not installed")
    return tool


def _rest(port: int, path: str, data: bytes | None = None, method: str | None = None):
    import json
    import urllib.request

    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data, method=method or ("POST" if data is not None else "GET"))
    with urllib.request.urlopen(req, timeout=120) as resp:
        body = resp.read()
    return json.loads(body) if body else None


def test_round_trip_through_orthanc_as_the_pacs(lung_dicom, lung_run, tmp_path):
    """The CT is uploaded to Orthanc; Orthanc sends it to the node (C-STORE); the RTSTRUCT comes
    back to Orthanc, whose REST API shows it in the same study."""
    import json

    orthanc = _orthanc()
    dicom_port, http_port = free_port(), free_port()
    node = Node(lung_run, tmp_path / "store", "--send-to", f"ORTHANC@127.0.0.1:{dicom_port}", "--allow", "ORTHANC",
                caller="ORTHANC")
    config = {"Name": "sats-test", "StorageDirectory": str(tmp_path / "orthanc-db"), "IndexDirectory": str(tmp_path / "orthanc-db"),
              "DicomAet": "ORTHANC", "DicomPort": dicom_port, "HttpPort": http_port, "RemoteAccessAllowed": False,
              "AuthenticationEnabled": False, "DicomServerEnabled": True, "Plugins": [],
              "DicomModalities": {"sats": ["SATS", "127.0.0.1", node.port]}}
    (tmp_path / "orthanc.json").write_text(json.dumps(config))
    server = subprocess.Popen([orthanc, str(tmp_path / "orthanc.json")], stdout=subprocess.DEVNULL,
                              stderr=open(tmp_path / "orthanc.log", "wb"), start_new_session=True)
    try:
        deadline = time.time() + 60
        while True:
            try:
                _rest(http_port, "/system")
                break
            except OSError:
                assert server.poll() is None and time.time() < deadline, (tmp_path / "orthanc.log").read_text()[-2000:]
                time.sleep(0.3)
        for f in _ct_files(lung_dicom):
            _rest(http_port, "/instances", f.read_bytes())
        (study,) = _rest(http_port, "/studies")
        (series,) = _rest(http_port, f"/studies/{study}/series")
        _rest(http_port, "/modalities/sats/store", json.dumps({"Resources": [series["ID"]], "Synchronous": True}).encode())
        deadline = time.time() + 240
        while time.time() < deadline:
            modalities = {s["MainDicomTags"].get("Modality") for s in _rest(http_port, f"/studies/{study}/series")}
            if "RTSTRUCT" in modalities:
                break
            time.sleep(1)
        assert "RTSTRUCT" in modalities, node.output()
        (rt,) = [s for s in _rest(http_port, f"/studies/{study}/series") if s["MainDicomTags"].get("Modality") == "RTSTRUCT"]
        rs = pydicom.dcmread(__import__("io").BytesIO(urllib_get(http_port, f"/instances/{rt['Instances'][0]}/file")))
        ref = rs.ReferencedFrameOfReferenceSequence[0].RTReferencedStudySequence[0].RTReferencedSeriesSequence[0]
        assert ref.SeriesInstanceUID == series["MainDicomTags"]["SeriesInstanceUID"]
        wait_state(tmp_path / "store", "sent", 30)
    finally:
        node.stop()
        server.terminate()
        server.wait(30)


def urllib_get(port: int, path: str) -> bytes:
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=60) as resp:
        return resp.read()
