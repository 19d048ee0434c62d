"""The review sheet: one picture per prediction for the person who signs the contour off.

Three CT slices through the GTV (or through the ROI where the mask is empty), axial,
coronal and sagittal, in a soft-tissue window (W 400, L 40 HU), with the mask's outline,
the ROI box the network ran over, the verdict of :mod:`sats.predict.quality`, its score and
its reason. Written as ``{case}_review.png`` beside every mask and, with
``sats predict --format sc``, as a DICOM Secondary Capture image in the CT's study, which
any PACS viewer shows (many show neither SEG nor RTSTRUCT).

Slices are the input's own (z, y, x) array axes, as stored: the patient side of the image
edges is read from the CT's direction matrix and printed on the panels.
"""

from __future__ import annotations

import datetime as _dt
import textwrap
import warnings
from pathlib import Path

import numpy as np

from sats.data.io import atomic_path
from sats.geometry.volume import SatsError, Volume

__all__ = ["review_image", "write_review_png", "write_review_sc"]

#: Soft-tissue window (centre, width), HU.
WINDOW = (40.0, 400.0)
#: LPS letters of +x, +y, +z (DICOM's patient axes) and their opposites.
_LPS = ("L", "P", "S")
_OPPOSITE = {"L": "R", "P": "A", "S": "I"}


def _side(direction: np.ndarray, axis_xyz: int, positive: bool) -> str:
    """The patient side (R/L/A/P/I/S) an image axis points to: the largest LPS component
    of the direction column ``axis_xyz`` (0 = x, the array's last axis)."""
    col = direction[:, axis_xyz] * (1 if positive else -1)
    k = int(np.argmax(np.abs(col)))
    return _LPS[k] if col[k] > 0 else _OPPOSITE[_LPS[k]]


def _centre(mask: np.ndarray, box: tuple[slice, slice, slice] | None) -> tuple[int, int, int]:
    """Where the slices cross: the mask's centre of mass, else the box's centre, else the volume's."""
    if mask.any():
        return tuple(int(round(v)) for v in np.argwhere(mask).mean(axis=0))  # type: ignore[return-value]
    if box is not None:
        return tuple((s.start + s.stop) // 2 for s in box)  # type: ignore[return-value]
    return tuple(n // 2 for n in mask.shape)  # type: ignore[return-value]


def review_image(ct: Volume, mask: Volume, qa: dict, title: str, box: tuple[slice, slice, slice] | None = None) -> np.ndarray:
    """The review sheet as an RGB uint8 array (rows, columns, 3).

    Args:
        ct: the input CT, HU, (z, y, x).
        mask: the prediction on the CT's grid (non-zero = inside).
        qa: the verdict (:func:`sats.predict.quality.assess`).
        title: what the sheet names the case by.
        box: the ROI on the CT's grid (z, y, x slices), drawn as a rectangle; the panels show
            it with half its size around it (the whole slice without a box).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    hu, m = ct.array, mask.array > 0
    cz, cy, cx = _centre(m, box)
    sz, sy, sx = ct.spacing
    lo, hi = WINDOW[0] - WINDOW[1] / 2, WINDOW[0] + WINDOW[1] / 2
    d = ct.direction
    # (image, mask, aspect = row mm / column mm, (row slice, column slice) of the box, edge labels)
    views = [
        ("axial", hu[cz], m[cz], sy / sx, (1, 2), (_side(d, 0, False), _side(d, 0, True)), (_side(d, 1, False), _side(d, 1, True))),
        ("coronal", hu[:, cy][::-1], m[:, cy][::-1], sz / sx, (0, 2), (_side(d, 0, False), _side(d, 0, True)), (_side(d, 2, True), _side(d, 2, False))),
        ("sagittal", hu[:, :, cx][::-1], m[:, :, cx][::-1], sz / sy, (0, 1), (_side(d, 1, False), _side(d, 1, True)), (_side(d, 2, True), _side(d, 2, False))),
    ]
    flagged = qa.get("flag") == "review"
    fig, axes = plt.subplots(1, 3, figsize=(12, 5.2), dpi=100)
    fig.patch.set_facecolor("black")
    for ax, (name, img, msk, aspect, axes_idx, (left, right), (top, bottom)) in zip(axes, views):
        ax.imshow(img, cmap="gray", vmin=lo, vmax=hi, aspect=aspect, interpolation="nearest")
        if msk.any():
            ax.contour(msk.astype(float), levels=[0.5], colors=["#ff3030"], linewidths=1.2)
        if box is not None:
            rows, cols = box[axes_idx[0]], box[axes_idx[1]]
            r0, r1 = (rows.start, rows.stop) if axes_idx[0] != 0 else (img.shape[0] - rows.stop, img.shape[0] - rows.start)
            ax.add_patch(Rectangle((cols.start - 0.5, r0 - 0.5), cols.stop - cols.start, r1 - r0, fill=False,
                                   edgecolor="#ffd000", linewidth=1.0, linestyle="--"))
            # Zoomed on the ROI with half its size around it: the contour must be readable.
            mr, mc = max(10, (r1 - r0) // 2), max(10, (cols.stop - cols.start) // 2)
            ax.set_xlim(max(cols.start - mc, 0) - 0.5, min(cols.stop + mc, img.shape[1]) - 0.5)
            ax.set_ylim(min(r1 + mr, img.shape[0]) - 0.5, max(r0 - mr, 0) - 0.5)
        ax.set_title(name, color="white", fontsize=10)
        for (x, y, text, ha, va) in ((0.01, 0.5, left, "left", "center"), (0.99, 0.5, right, "right", "center"),
                                     (0.5, 0.99, top, "center", "top"), (0.5, 0.01, bottom, "center", "bottom")):
            ax.text(x, y, text, color="#80c0ff", fontsize=9, ha=ha, va=va, transform=ax.transAxes)
        ax.axis("off")
    score = qa.get("score")
    parts = qa.get("parts", {})
    head = (f"{title}:  {'REVIEW' if flagged else 'ok'}   score {score:.2f}" if score is not None else
            f"{title}:  {'REVIEW' if flagged else 'ok'}   (no fitted score)")
    ml = parts.get("volume_ml")
    detail = f"GTV {ml:.1f} ml" if ml is not None else ""
    fig.suptitle(head + (f"   {detail}" if detail else ""), color="#ff6060" if flagged else "#80ff80", fontsize=13, y=0.98)
    fig.text(0.5, 0.03, "\n".join(textwrap.wrap(str(qa.get("reason", "")), 150)[:3]), color="white", ha="center",
             va="bottom", fontsize=8.5)
    fig.text(0.99, 0.005, "red: contour; yellow dashes: region the network ran over; not for diagnosis without review",
             color="#a0a0a0", ha="right", va="bottom", fontsize=7)
    fig.subplots_adjust(left=0.01, right=0.99, top=0.88, bottom=0.12, wspace=0.03)
    fig.canvas.draw()
    rgb = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
    plt.close(fig)
    return rgb


def write_review_png(rgb: np.ndarray, path: Path) -> Path:
    """Write the sheet as a PNG, atomically."""
    from PIL import Image

    with atomic_path(Path(path), suffix=".png") as tmp:
        Image.fromarray(rgb).save(tmp, format="PNG")
    return Path(path)


def write_review_sc(rgb: np.ndarray, ct_dir: Path, out: Path, qa: dict, series_uid: str | None = None) -> Path:
    """Write the sheet as a DICOM Secondary Capture image (RGB) in a new series of the CT's
    study (patient and study copied from the CT series in ``ct_dir``), atomically."""
    import highdicom as hd
    import pydicom

    from sats import __version__
    from sats.predict.export import _save, load_ct_reference

    ct = load_ct_reference(ct_dir, series_uid)
    ref = pydicom.dcmread(ct.slices[0].path, stop_before_pixels=True)
    flagged = qa.get("flag") == "review"
    try:
        with warnings.catch_warnings():
            # Test and anonymised data often have one-component patient names: not the user's problem.
            warnings.filterwarnings("ignore", message=".*unlikely to represent the intended person name")
            # The sheet's panels face three ways: its orientation is that of the axial panel (rows
            # left to right, columns top to bottom as stored), which the panels' letters spell out.
            sc = hd.sc.SCImage.from_ref_dataset(
                ref_dataset=ref, pixel_array=np.ascontiguousarray(rgb, dtype=np.uint8), photometric_interpretation="RGB",
                bits_allocated=8, coordinate_system="PATIENT", series_instance_uid=hd.UID(), series_number=903,
                sop_instance_uid=hd.UID(), instance_number=1, manufacturer="sats", patient_orientation=("L", "P"),
                transfer_syntax_uid=pydicom.uid.ExplicitVRLittleEndian,
            )
    except (ValueError, AttributeError, TypeError) as exc:
        raise SatsError(f"{ct.folder}: cannot build a Secondary Capture on this CT series ({exc})") from None
    sc.Laterality = ""  # type 2C in General Series; a head is not a paired structure
    sc.SeriesDescription = ("sats GTV review sheet - REVIEW" if flagged else "sats GTV review sheet")[:64]
    sc.ImageComments = f"sats {__version__}: {qa.get('flag', '')}: {qa.get('reason', '')}"[:10240]
    sc.BurnedInAnnotation = "YES"
    now = _dt.datetime.now()
    sc.ContentDate, sc.ContentTime = now.strftime("%Y%m%d"), now.strftime("%H%M%S")
    _save(sc, Path(out))
    return Path(out)
