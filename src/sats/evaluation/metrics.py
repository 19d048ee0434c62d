"""Segmentation metrics of predicted GTV masks against references: DSC, HD95, ASD, NSD.

All arrays are ``(z, y, x)`` and every spacing is ``(z, y, x)`` in mm, as in
:class:`sats.data.io.Volume`. Masks are binarised as ``> 0``.

Definitions (one foreground label, both masks on the same grid):

* **DSC** (%): ``200 |P ∩ G| / (|P| + |G|)``.
* **Surface** of a mask: the mask voxels with at least one 6-connected neighbour in the
  background, i.e. ``mask & ~binary_erosion(mask, 6-connected)``, with everything outside
  the array counted as background. This is what MONAI's ``get_mask_edges`` computes
  (``binary_erosion(mask) ^ mask`` with scipy's default cross structuring element and
  ``border_value=0``).
* **Surface distances**: for every surface voxel of one mask, the Euclidean distance in mm
  (anisotropic spacing honoured) to the nearest surface voxel of the other mask, in both
  directions: ``d(P→G)`` and ``d(G→P)``.
* **HD95** (mm): ``max(percentile95(d(P→G)), percentile95(d(G→P)))`` (linear interpolation,
  numpy's and torch's default), as MONAI's ``compute_hausdorff_distance(percentile=95)``.
* **ASD** (mm): the mean of the *pooled* distances ``concat(d(P→G), d(G→P))``. MONAI's
  ``compute_average_surface_distance(symmetric=True)`` pools the same way (it concatenates
  both directions before ``mean()``), so the two agree. Note this differs from averaging the
  two directed means ``(mean(d(P→G)) + mean(d(G→P))) / 2`` when the surfaces have different
  voxel counts.
* **NSD** (%), surface Dice at tolerance τ mm (Nikolov et al., as used by SegRap2023):
  ``(#{d(P→G) ≤ τ} + #{d(G→P) ≤ τ}) / (|∂P| + |∂G|)``, where the surfaces are measured by
  **counting surface voxels**, not by DeepMind's surfel areas. This equals MONAI's
  ``compute_surface_dice(use_subvoxels=False)`` with the tolerance in mm.

Empty masks: both empty → DSC 100, HD95 0, ASD 0, NSD 100 (a correct "no tumour");
exactly one empty → DSC 0, NSD 0, HD95 and ASD ``inf``. Summaries never average an ``inf``:
such cases are counted and reported on their own line.
"""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from scipy import ndimage

from sats.data.io import IMAGE_SUFFIXES, atomic_path, case_id, is_image_file, read_image, write_text_atomic
from sats.geometry.volume import SatsError

Spacing = tuple[float, float, float]

CSV_COLUMNS = ("case", "dsc", "hd95", "asd", "nsd", "gt_ml", "pred_ml")

# 6-connected (face neighbours) cross: the structuring element for surfaces.
_CROSS = ndimage.generate_binary_structure(3, 1)


@dataclass(frozen=True)
class CaseMetrics:
    """Metrics of one case.

    Attributes:
        case: case id.
        dsc: Dice similarity coefficient, %.
        hd95: 95th-percentile Hausdorff distance, mm (``inf`` if exactly one mask is empty).
        asd: average symmetric surface distance, mm (``inf`` if exactly one mask is empty).
        nsd: normalised surface Dice at the tolerance used, %.
        gt_ml: reference volume, ml.
        pred_ml: predicted volume, ml.
    """

    case: str
    dsc: float
    hd95: float
    asd: float
    nsd: float
    gt_ml: float
    pred_ml: float

    @property
    def distances_finite(self) -> bool:
        """False when exactly one of the masks is empty (HD95 and ASD are ``inf``)."""
        return math.isfinite(self.hd95) and math.isfinite(self.asd)


# --------------------------------------------------------------------------- per case


def _binary(mask: np.ndarray) -> np.ndarray:
    mask = np.asarray(mask)
    if mask.ndim != 3:
        raise ValueError(f"expected a 3D (z, y, x) mask, got shape {mask.shape}")
    return mask if mask.dtype == bool else mask > 0


def _check_pair(pred: np.ndarray, gt: np.ndarray, spacing: Sequence[float]) -> tuple[np.ndarray, np.ndarray, Spacing]:
    pred, gt = _binary(pred), _binary(gt)
    if pred.shape != gt.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from reference shape {gt.shape}")
    if len(spacing) != 3 or any(not (s > 0) for s in spacing):
        raise ValueError(f"spacing must be three positive numbers (z, y, x) mm, got {tuple(spacing)}")
    return pred, gt, (float(spacing[0]), float(spacing[1]), float(spacing[2]))


def union_bbox(pred: np.ndarray, gt: np.ndarray, margin: int = 1) -> tuple[slice, slice, slice] | None:
    """Bounding box of ``pred | gt`` grown by ``margin`` voxels and clipped to the array.

    Args:
        pred, gt: boolean masks, shape ``(z, y, x)``.
        margin: voxels added on each side.

    Returns:
        ``(z, y, x)`` slices, or None when both masks are empty.
    """
    union = pred | gt
    box = []
    for axis in range(3):
        others = tuple(a for a in range(3) if a != axis)
        hits = np.flatnonzero(union.any(axis=others))
        if hits.size == 0:
            return None
        box.append(slice(max(int(hits[0]) - margin, 0), min(int(hits[-1]) + 1 + margin, union.shape[axis])))
    return box[0], box[1], box[2]


def surface(mask: np.ndarray) -> np.ndarray:
    """Surface voxels of a boolean ``(z, y, x)`` mask: voxels with a 6-connected background neighbour.

    The outside of the array counts as background (``border_value=0``), so a mask touching
    the array edge has a surface there, as in MONAI.
    """
    mask = _binary(mask)
    return mask & ~ndimage.binary_erosion(mask, structure=_CROSS, border_value=0)


def surface_distances(
    pred: np.ndarray, gt: np.ndarray, spacing: Sequence[float], crop: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """Directed surface distances in mm between two non-empty masks.

    Args:
        pred, gt: masks (``> 0`` is foreground), shape ``(z, y, x)``; both must be non-empty.
        spacing: voxel size ``(z, y, x)`` in mm.
        crop: work on the union bounding box (plus one voxel) instead of the whole array.
            The result is identical: every surface voxel of either mask lies in the union
            box, so the nearest-surface search never needs anything outside it; and a mask
            voxel on the box face is surface in the full array too (its outer neighbour is
            background), exactly as the erosion's ``border_value=0`` makes it in the crop.
            The one-voxel margin makes this hold without relying on that argument (the
            crop's own border is then background, as in MONAI's ``CropForeground(margin=1)``).

    Returns:
        ``(d_pred_to_gt, d_gt_to_pred)``: 1D float64 arrays, one distance per surface voxel
        of ``pred`` (to the nearest ``gt`` surface voxel) and of ``gt`` (to ``pred``'s).

    Raises:
        ValueError: when either mask is empty (distances are undefined).
    """
    pred, gt, spacing = _check_pair(pred, gt, spacing)
    if crop:
        box = union_bbox(pred, gt, margin=1)
        if box is not None:
            pred, gt = pred[box], gt[box]
    if not pred.any() or not gt.any():
        raise ValueError("surface distances need two non-empty masks")
    surf_pred, surf_gt = surface(pred), surface(gt)
    # EDT of the complement of a surface = distance (mm, per-axis sampling) from every voxel
    # to the nearest voxel of that surface; read it off at the other surface.
    to_gt = ndimage.distance_transform_edt(~surf_gt, sampling=spacing)
    to_pred = ndimage.distance_transform_edt(~surf_pred, sampling=spacing)
    return to_gt[surf_pred], to_pred[surf_gt]


def dice(pred: np.ndarray, gt: np.ndarray) -> float:
    """Dice similarity coefficient in % of two ``(z, y, x)`` masks; 100 when both are empty."""
    pred, gt = _binary(pred), _binary(gt)
    total = int(pred.sum()) + int(gt.sum())
    if total == 0:
        return 100.0
    return 200.0 * int(np.logical_and(pred, gt).sum()) / total


def _hd95(d_pg: np.ndarray, d_gp: np.ndarray) -> float:
    return float(max(np.percentile(d_pg, 95), np.percentile(d_gp, 95)))


def _asd(d_pg: np.ndarray, d_gp: np.ndarray) -> float:
    return float(np.concatenate([d_pg, d_gp]).mean())


def _nsd(d_pg: np.ndarray, d_gp: np.ndarray, tolerance_mm: float) -> float:
    within = int((d_pg <= tolerance_mm).sum()) + int((d_gp <= tolerance_mm).sum())
    return 100.0 * within / (d_pg.size + d_gp.size)


def _empty_rule(pred: np.ndarray, gt: np.ndarray) -> tuple[float, float] | None:
    """(distance, surface score) for the empty cases, or None when both masks have voxels."""
    p, g = bool(pred.any()), bool(gt.any())
    if p and g:
        return None
    return (0.0, 100.0) if not p and not g else (math.inf, 0.0)


def hd95(pred: np.ndarray, gt: np.ndarray, spacing: Sequence[float]) -> float:
    """95th-percentile Hausdorff distance in mm: the larger of the two directed 95th percentiles.

    0 when both masks are empty, ``inf`` when exactly one is.
    """
    pred, gt, spacing = _check_pair(pred, gt, spacing)
    empty = _empty_rule(pred, gt)
    return empty[0] if empty else _hd95(*surface_distances(pred, gt, spacing))


def average_surface_distance(pred: np.ndarray, gt: np.ndarray, spacing: Sequence[float]) -> float:
    """Average symmetric surface distance in mm: mean of both directions' distances pooled.

    0 when both masks are empty, ``inf`` when exactly one is.
    """
    pred, gt, spacing = _check_pair(pred, gt, spacing)
    empty = _empty_rule(pred, gt)
    return empty[0] if empty else _asd(*surface_distances(pred, gt, spacing))


def normalized_surface_dice(
    pred: np.ndarray, gt: np.ndarray, spacing: Sequence[float], tolerance_mm: float = 1.0
) -> float:
    """Surface Dice in % at ``tolerance_mm``, surfaces measured by counting surface voxels.

    100 when both masks are empty, 0 when exactly one is.
    """
    pred, gt, spacing = _check_pair(pred, gt, spacing)
    empty = _empty_rule(pred, gt)
    return empty[1] if empty else _nsd(*surface_distances(pred, gt, spacing), tolerance_mm)


def compute_metrics(
    pred: np.ndarray,
    gt: np.ndarray,
    spacing: Sequence[float],
    nsd_tolerance_mm: float = 1.0,
    case: str = "",
) -> CaseMetrics:
    """All metrics of one case, surface distances computed once.

    Args:
        pred: predicted mask, shape ``(z, y, x)``; ``> 0`` is tumour.
        gt: reference mask, same shape.
        spacing: voxel size ``(z, y, x)`` in mm.
        nsd_tolerance_mm: NSD tolerance in mm.
        case: case id stored in the result.

    Returns:
        :class:`CaseMetrics` with DSC/NSD in %, HD95/ASD in mm, volumes in ml.
    """
    pred, gt, spacing = _check_pair(pred, gt, spacing)
    voxel_ml = float(np.prod(spacing)) / 1000.0
    # Crop once here: the DSC and the distances only look inside the union box.
    box = union_bbox(pred, gt, margin=1)
    if box is None:  # both empty: a correct "no tumour"
        return CaseMetrics(case, 100.0, 0.0, 0.0, 100.0, 0.0, 0.0)
    pred, gt = pred[box], gt[box]
    n_pred, n_gt = int(pred.sum()), int(gt.sum())
    dsc = 200.0 * int(np.logical_and(pred, gt).sum()) / (n_pred + n_gt)
    if n_pred == 0 or n_gt == 0:
        return CaseMetrics(case, dsc, math.inf, math.inf, 0.0, n_gt * voxel_ml, n_pred * voxel_ml)
    d_pg, d_gp = surface_distances(pred, gt, spacing, crop=False)
    return CaseMetrics(
        case=case,
        dsc=dsc,
        hd95=_hd95(d_pg, d_gp),
        asd=_asd(d_pg, d_gp),
        nsd=_nsd(d_pg, d_gp, nsd_tolerance_mm),
        gt_ml=n_gt * voxel_ml,
        pred_ml=n_pred * voxel_ml,
    )


# --------------------------------------------------------------------------- folders


def _index_cases(folder: Path, what: str) -> dict[str, Path]:
    if not folder.exists():
        raise SatsError(f"{folder}: no such {what} folder")
    if not folder.is_dir():
        raise SatsError(f"{folder}: not a folder")
    cases: dict[str, Path] = {}
    # Hidden files are skipped: they include atomic-write temporaries (".name.xxx.tmp.nii.gz").
    for path in sorted(p for p in folder.iterdir() if not p.name.startswith(".") and is_image_file(p)):
        cid = case_id(path)
        if cid in cases:
            raise SatsError(f"{folder}: two {what} files for case {cid!r}: {cases[cid].name} and {path.name}")
        cases[cid] = path
    return cases


def evaluate_folders(
    pred_dir: Path, gt_dir: Path, nsd_tolerance_mm: float = 1.0, console=None
) -> list[CaseMetrics]:
    """Evaluate every reference in ``gt_dir`` against the prediction with the same case id.

    Case ids are file names without the image suffix and without a trailing ``_0000``.
    Predictions without a reference are ignored (with a note on ``console``).

    Args:
        pred_dir: folder of predicted masks.
        gt_dir: folder of reference masks.
        nsd_tolerance_mm: NSD tolerance, mm.
        console: a ``rich.console.Console`` for notes and a progress bar, or None for silence.

    Returns:
        One :class:`CaseMetrics` per reference, sorted by case id.

    Raises:
        SatsError: no references; a reference without prediction (naming the case); a
            prediction on another grid than its reference (naming the case and the
            difference); an unreadable image (naming the file).
    """
    pred_dir, gt_dir = Path(pred_dir), Path(gt_dir)
    refs = _index_cases(gt_dir, "reference")
    if not refs:
        raise SatsError(f"{gt_dir}: no reference images (expected {', '.join(IMAGE_SUFFIXES)} files)")
    preds = _index_cases(pred_dir, "prediction")
    # Check every pairing before the (slow) reading so that a typo fails at once.
    missing = [c for c in refs if c not in preds]
    if missing:
        more = f" (and {len(missing) - 1} more: {', '.join(missing[1:6])}{', ...' if len(missing) > 6 else ''})" if len(missing) > 1 else ""
        raise SatsError(f"{pred_dir}: no prediction for case {missing[0]!r}{more}")
    extra = sorted(set(preds) - set(refs))
    if extra and console is not None:
        listed = ", ".join(extra[:5]) + (", ..." if len(extra) > 5 else "")
        console.print(f"note: {len(extra)} prediction(s) without a reference ignored: {listed}", highlight=False)

    results: list[CaseMetrics] = []
    progress = None
    if console is not None:
        from sats.progress import progress_bar

        progress = progress_bar(console, transient=True)
        progress.start()
    try:
        task = progress.add_task("evaluating", total=len(refs)) if progress else None
        for cid, gt_path in refs.items():
            pred_path = preds[cid]
            gt_vol, pred_vol = read_image(gt_path), read_image(pred_path)
            diff = gt_vol.same_geometry(pred_vol)
            if diff is not None:
                raise SatsError(
                    f"case {cid!r}: prediction {pred_path} is not on the reference grid: {diff} (reference vs prediction)"
                )
            results.append(compute_metrics(pred_vol.array, gt_vol.array, gt_vol.spacing, nsd_tolerance_mm, case=cid))
            if progress is not None:
                progress.advance(task)
    finally:
        if progress is not None:
            progress.stop()
    return results


# --------------------------------------------------------------------------- outputs


def _fmt(value: float, digits: int) -> str:
    return "inf" if math.isinf(value) else f"{value:.{digits}f}"


def write_csv(results: Sequence[CaseMetrics], path: str | Path) -> Path:
    """Write per-case metrics atomically, columns ``case,dsc,hd95,asd,nsd,gt_ml,pred_ml``.

    DSC/NSD in %, HD95/ASD in mm (``inf`` written as ``inf``), volumes in ml.
    """
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for r in results:
        writer.writerow([r.case, _fmt(r.dsc, 4), _fmt(r.hd95, 4), _fmt(r.asd, 4), _fmt(r.nsd, 4),
                         _fmt(r.gt_ml, 3), _fmt(r.pred_ml, 3)])
    return write_text_atomic(path, buffer.getvalue())


def _mean_std(values: Sequence[float]) -> tuple[float, float] | None:
    # Population standard deviation (numpy's default, ddof=0), as in most segmentation tables.
    if len(values) == 0:
        return None
    arr = np.asarray(values, dtype=np.float64)
    return float(arr.mean()), float(arr.std())


def summarize(results: Sequence[CaseMetrics]) -> dict[str, tuple[float, float, int] | None]:
    """Mean, std and count per metric: ``{"dsc", "hd95", "asd", "nsd"} -> (mean, std, n)``.

    DSC and NSD use every case (an empty-vs-non-empty case counts as 0); HD95 and ASD use only
    the cases with finite distances. None where no case qualifies.
    """
    finite = [r for r in results if r.distances_finite]
    out: dict[str, tuple[float, float, int] | None] = {}
    for key, pool in (("dsc", results), ("hd95", finite), ("asd", finite), ("nsd", results)):
        ms = _mean_std([getattr(r, key) for r in pool])
        out[key] = None if ms is None else (ms[0], ms[1], len(pool))
    return out


def print_summary(results: Sequence[CaseMetrics], console) -> None:
    """Print mean ± std of DSC (%), HD95 (mm), ASD (mm), NSD (%) as a rich table, 2 decimals.

    Cases with exactly one empty mask are reported on their own line, not averaged as numbers.
    """
    from rich.table import Table

    stats = summarize(results)
    table = Table(title=f"Evaluation of {len(results)} case(s)", title_justify="left")
    table.add_column("metric")
    table.add_column("mean ± std", justify="right")
    table.add_column("n", justify="right")
    for key, label in (("dsc", "DSC (%)"), ("hd95", "HD95 (mm)"), ("asd", "ASD (mm)"), ("nsd", "NSD (%)")):
        s = stats[key]
        table.add_row(label, "n/a" if s is None else f"{s[0]:.2f} ± {s[1]:.2f}", "0" if s is None else str(s[2]))
    console.print(table)
    one_empty = [r.case for r in results if not r.distances_finite]
    if one_empty:
        n = len(one_empty)
        console.print(
            f"{n} {'case' if n == 1 else 'cases'} with an empty prediction or reference: distances inf, "
            f"excluded from the distance means ({', '.join(one_empty[:10])}{', ...' if n > 10 else ''})",
            highlight=False,
        )
    both_empty = [r.case for r in results if r.gt_ml == 0 and r.pred_ml == 0]
    if both_empty:
        n = len(both_empty)
        console.print(
            f"{n} {'case' if n == 1 else 'cases'} with both masks empty: scored DSC 100, HD95 0, ASD 0, NSD 100",
            highlight=False,
        )


def plot_dice(results: Sequence[CaseMetrics], path: str | Path) -> Path:
    """Per-case Dice bar plot sorted by Dice, mean as a dashed line; PNG written atomically."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not results:
        raise SatsError(f"{path}: no cases to plot")
    ordered = sorted(results, key=lambda r: r.dsc)
    dsc = [r.dsc for r in ordered]
    mean = float(np.mean(dsc))
    # A plain Figure with an Agg canvas: no pyplot global state, no display needed.
    fig = Figure(figsize=(max(6.0, 0.18 * len(ordered) + 2.0), 4.0), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.bar(range(len(ordered)), dsc, color="tab:blue", width=0.8)
    ax.axhline(mean, color="tab:red", linestyle="--", linewidth=1.2, label=f"mean {mean:.2f}%")
    if len(ordered) <= 60:  # beyond that the labels are unreadable
        ax.set_xticks(range(len(ordered)))
        ax.set_xticklabels([r.case for r in ordered], rotation=90, fontsize=7)
    ax.set_xlim(-0.6, len(ordered) - 0.4)
    ax.set_ylim(0, 100)
    ax.set_xlabel("case (sorted by Dice)")
    ax.set_ylabel("Dice (%)")
    ax.legend(loc="upper left")  # bars rise to the right
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png")
    return path
