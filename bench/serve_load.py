"""Load on `sats serve`: N CT series sent at once from N associations (the PACS side), all
answered with an RTSTRUCT (the planning-system side); throughput and the node's peak memory.

    python bench/serve_load.py --model RUN --cts CT1.nii.gz CT2.nii.gz ... [--workers 1]

Each CT is written as a DICOM series (its own study), a node is started with
``--send-to`` this script's storage SCP, and every series is sent in its own association,
all at once. Prints one table row; exits 1 if any series is not answered in time.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pydicom
from pynetdicom import AE, StoragePresentationContexts, evt
from pynetdicom.sop_class import CTImageStorage, Verification

from sats.data.dicom import write_ct_series
from sats.data.io import read_image
from sats.hardware import available_cores


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--cts", type=Path, nargs="+", required=True)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--timeout", type=float, default=1800)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="sats_serve_load_"))
    series = []
    for i, ct in enumerate(args.cts):
        files = write_ct_series(read_image(ct), tmp / f"series{i}", patient_id=f"LOAD{i}", patient_name=f"Load^{i}")
        series.append([pydicom.dcmread(f) for f in files])
    arrivals: list[tuple[float, str]] = []
    tps = AE(ae_title="TPS")
    tps.supported_contexts = StoragePresentationContexts
    tps_port, node_port = _port(), _port()
    server = tps.start_server(("127.0.0.1", tps_port), block=False, evt_handlers=[
        (evt.EVT_C_STORE, lambda e: arrivals.append((time.time(), str(e.dataset.PatientID))) or 0)])
    cmd = [sys.executable, "-m", "sats", "serve", "-m", str(args.model), "--store", str(tmp / "store"), "--host", "127.0.0.1",
           "--port", str(node_port), "--send-to", f"TPS@127.0.0.1:{tps_port}", "--workers", str(args.workers), "--settle", "5"]
    node = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=open(tmp / "node.log", "wb"))
    scu = AE(ae_title="PACS")
    scu.add_requested_context(CTImageStorage)
    scu.add_requested_context(Verification)
    while True:  # until the node answers C-ECHO
        assert node.poll() is None, (tmp / "node.log").read_text()[-2000:]
        assoc = scu.associate("127.0.0.1", node_port, ae_title="SATS")
        if assoc.is_established:
            assoc.release()
            break
        time.sleep(0.5)

    def send(datasets: list[pydicom.Dataset]) -> None:
        a = scu.associate("127.0.0.1", node_port, ae_title="SATS")
        for ds in datasets:
            a.send_c_store(ds)
        a.release()

    t0 = time.time()
    threads = [threading.Thread(target=send, args=(s,)) for s in series]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    sent = time.time() - t0
    while len(arrivals) < len(series) and time.time() - t0 < args.timeout and node.poll() is None:
        time.sleep(0.5)
    peak = _peak_rss_mib(node.pid)
    node.terminate()
    node.wait()
    server.shutdown()
    slices = sum(len(s) for s in series)
    wall = (arrivals[-1][0] - t0) if arrivals else float("nan")
    print(f"| series | slices | workers | all sent (s) | last RTSTRUCT back (s) | series/min | node peak RSS (MiB) | answered |")
    print("|---|---|---|---|---|---|---|---|")
    print(f"| {len(series)} | {slices} | {args.workers} | {sent:.1f} | {wall:.1f} | {60 * len(arrivals) / wall:.2f} | {peak:.0f} | "
          f"{len(arrivals)}/{len(series)} |")
    print("order of completion:", ", ".join(f"{pid} at {t - t0:.0f} s" for t, pid in arrivals))
    sys.exit(0 if len(arrivals) == len(series) else 1)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", str(available_cores()))
    main()
