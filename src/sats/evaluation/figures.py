"""Figures for people: overlays of reference and prediction, and the asymmetry map.

Display conventions: axial slices in the radiological view (patient right on the image's
left; array x runs right -> left, so it is drawn as stored), coronal and sagittal with the
head up (array z runs inferior -> superior, so it is flipped for display).
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from sats.data.io import atomic_path
from sats.geometry.volume import Volume

WINDOW = (-160.0, 240.0)  # soft-tissue window W400 / L40


def _centre(*masks: np.ndarray, shape: tuple[int, int, int]) -> tuple[int, int, int]:
    for m in masks:
        if m is not None and m.any():
            return tuple(int(round(v)) for v in np.argwhere(m).mean(axis=0))  # type: ignore[return-value]
    return tuple(s // 2 for s in shape)  # type: ignore[return-value]


def _views(volume: Volume, centre: tuple[int, int, int]):
    sz, sy, sx = volume.spacing
    z, y, x = centre
    return [
        ("axial", lambda a: a[z], sy / sx),
        ("coronal", lambda a: a[:, y][::-1], sz / sx),
        ("sagittal", lambda a: a[:, :, x][::-1], sz / sy),
    ]


def _save(fig, path: Path) -> Path:
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=90, bbox_inches="tight")
    plt.close(fig)
    return path


def overlay_png(ct: Volume, reference: np.ndarray | None, prediction: np.ndarray, path: Path, title: str = "") -> Path:
    """Axial, coronal and sagittal slices through the tumour centre (reference first):
    reference contour green, prediction red."""
    centre = _centre(reference, prediction, shape=ct.shape)
    fig, axes = plt.subplots(1, 3, figsize=(13, 4.6))
    for ax, (name, cut, aspect) in zip(axes, _views(ct, centre)):
        ax.imshow(cut(ct.array), cmap="gray", vmin=WINDOW[0], vmax=WINDOW[1], aspect=aspect)
        if reference is not None and cut(reference).any():
            ax.contour(cut(reference), [0.5], colors="lime", linewidths=1.3)
        if cut(prediction).any():
            ax.contour(cut(prediction), [0.5], colors="red", linewidths=1.1)
        ax.set_title(name)
        ax.axis("off")
    fig.suptitle(f"{title}  (reference green, prediction red)" if title else "reference green, prediction red")
    fig.tight_layout()
    return _save(fig, path)


def asymmetry_png(ct: Volume, asymmetry: np.ndarray, path: Path, mask: np.ndarray | None = None, title: str = "") -> Path:
    """The asymmetry map ||g(E) - g(E')|| over the CT, with the predicted GTV outlined."""
    centre = _centre(mask, shape=ct.shape)
    fig, axes = plt.subplots(1, 3, figsize=(13, 4.6))
    vmax = float(np.percentile(asymmetry, 99.9)) or 1.0
    for ax, (name, cut, aspect) in zip(axes, _views(ct, centre)):
        ax.imshow(cut(ct.array), cmap="gray", vmin=WINDOW[0], vmax=WINDOW[1], aspect=aspect)
        heat = ax.imshow(cut(asymmetry), cmap="inferno", alpha=0.55, vmin=0, vmax=vmax, aspect=aspect)
        if mask is not None and cut(mask).any():
            ax.contour(cut(mask), [0.5], colors="cyan", linewidths=1.0)
        ax.set_title(name)
        ax.axis("off")
    fig.colorbar(heat, ax=axes, fraction=0.02, label="||g(E) - g(E')||")
    fig.suptitle(title or "asymmetry map (prediction in cyan)")
    return _save(fig, path)


def training_curves_png(history: list[dict], path: Path, stage1_epochs: int) -> Path:
    """Training losses and validation Dice per epoch (a RUN folder's log.csv rows);
    a dashed line marks the start of stage 2."""
    ep = [r["epoch"] for r in history]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for k in ("loss", "dice", "ce"):
        ax1.plot(ep, [r[k] for r in history], label=k)
    if any(r["margin"] for r in history):
        ax1.plot(ep, [r["margin"] for r in history], label="margin")
    ax1.set_xlabel("epoch"), ax1.set_ylabel("training loss"), ax1.legend()
    ax2.plot(ep, [r["val_dice"] for r in history], "o-", ms=3)
    ax2.set_xlabel("epoch"), ax2.set_ylabel("validation Dice"), ax2.set_ylim(0, 1)
    for ax in (ax1, ax2):
        ax.axvline(stage1_epochs + 0.5, color="grey", ls="--", lw=0.8)
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)
    return path
