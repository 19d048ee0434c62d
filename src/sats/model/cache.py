"""The case cache: every training CT preprocessed once, kept as ``.npy`` for the runs that follow.

Layout of a cache folder (``RUN/cache`` by default; an ablation shares one between its runs)::

    meta.json                    key, spacing, intensity statistics, alignment, each case's plane
                                 (Alignment.to_dict) and the cases left out with their reasons
    {case}_image.npy             normalised float32 (z, y, x) on the case's symmetric grid
    {case}_label.npy             uint8, same grid
    {case}_asym.npy, asym.json   m_unsup of the labelled cases and its keys (where a run uses it)
    unlabelled/                  unlabelled CTs: {id}_image.npy, {id}_asym.npy, {id}_plane.json, unlabelled.json

Every case goes through :class:`sats.geometry.preprocessing.Preprocessor` with the run's
alignment (:class:`~sats.geometry.preprocessing.PlaneSettings`). ``meta.json`` is written
last and names a key over the input files and the settings, so a cache left half-written by
a killed run is simply rebuilt, and one built with other settings is never read.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
from rich.console import Console

from sats.data.dataset import list_cases
from sats.data.io import atomic_path, read_image, read_spacing, write_text_atomic
from sats.geometry.alignment import Alignment, UnreliablePlane
from sats.geometry.preprocessing import IntensityStats, PlaneSettings, Preprocessor, foreground_samples, intensity_stats
from sats.geometry.volume import SatsError, about
from sats.model.config import TrainConfig
from sats.model.patches import CaseArrays
from sats.model.run import RUN_FORMAT
from sats.progress import progress_bar


def plane_settings(cfg: TrainConfig) -> PlaneSettings:
    """How a run finds each CT's plane: its ``align`` and ``atlas``; an unreliable plane raises."""
    return PlaneSettings.of(cfg.align, cfg.atlas)


def fingerprint(path: Path) -> str:
    """Path, size and modification time of a file, or of every file of a folder (a DICOM series)."""
    files = sorted(f for f in path.iterdir() if f.is_file()) if path.is_dir() else [path]
    return ";".join(f"{f.resolve()}:{st.st_size}:{st.st_mtime_ns}" for f in files for st in [f.stat()])


def _cache_key(files: list[Path], spacing, stats: IntensityStats, align: str) -> str:
    h = hashlib.sha256()
    h.update(json.dumps({"spacing": list(spacing), "stats": stats.to_dict(), "align": align, "v": RUN_FORMAT}).encode())
    for f in files:
        h.update(fingerprint(f).encode())
    return h.hexdigest()[:16]


def _save_npy(path: Path, array: np.ndarray) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.save(fh, array)


def training_cases(dataset: Path):
    """The labelled training cases of a dataset (an error when there are none). imagesTr
    entries without a label are unlabelled CTs (:func:`unlabelled_inputs`)."""
    cases = list_cases(dataset, "Tr")
    if not cases:
        raise SatsError(f"{dataset}: no training cases in imagesTr")
    labelled = [c for c in cases if c.label is not None]
    if not labelled:
        raise SatsError(f"{dataset}: no training case has a label in labelsTr (run `sats check {dataset}`)")
    return labelled


def median_spacing(dataset: Path) -> tuple[float, float, float]:
    """Median voxel spacing (z, y, x) mm of the training images (read from the headers)."""
    spacings = [read_spacing(c.image) for c in training_cases(dataset)]
    return tuple(float(v) for v in np.median(np.array(spacings), axis=0))  # type: ignore[return-value]


def prepare_cases(dataset: Path, cache: Path, cfg: TrainConfig, console: Console | None,
                  rank: int = 0) -> tuple[list[CaseArrays], IntensityStats, tuple]:
    """Preprocess every labelled training case once (align, resample, crop to the body,
    normalise) into ``cache``, or read it from there. Returns the cases, the intensity
    statistics and the spacing.

    A CT whose mid-sagittal plane is unreliable (:class:`sats.geometry.alignment.UnreliablePlane`)
    is left out with a warning and listed under ``left_out`` in ``meta.json``: one CT that
    cannot be aligned must not stop a training of hundreds.
    """
    if cfg.spacing is None:
        raise ValueError("prepare_cases needs cfg.spacing set (see config.fit_to_data)")
    spacing = tuple(float(v) for v in cfg.spacing)
    planes = plane_settings(cfg)
    cases = training_cases(dataset)
    meta_file = cache / "meta.json"
    files = [c.image for c in cases] + [c.label for c in cases]  # type: ignore[misc]
    if meta_file.exists():
        meta = json.loads(meta_file.read_text())
        stats = IntensityStats(**meta["stats"])
        if meta.get("key") == _cache_key(files, spacing, stats, planes.key) and meta.get("spacing") == list(spacing):
            left_out = meta.get("left_out", {})
            return _load_cache(cache, [c.case_id for c in cases if c.case_id not in left_out]), stats, spacing
    if rank != 0:
        raise SatsError("the training cache must be prepared by rank 0 first")
    cache.mkdir(parents=True, exist_ok=True)
    with progress_bar(console) as progress:
        task = progress.add_task("reading", total=len(cases))
        volumes, samples = [], []
        for c in cases:
            ct, lab = read_image(c.image), read_image(c.label)  # type: ignore[arg-type]
            volumes.append((ct, lab))
            samples.append(foreground_samples(ct, lab))
            progress.advance(task)
        stats = intensity_stats(samples)
        prep = Preprocessor(spacing, stats, planes)
        task = progress.add_task("aligning and preprocessing" if cfg.align else "preprocessing", total=len(cases))
        found, left_out = {}, {}
        for c, (ct, lab) in zip(cases, volumes):
            with about(c.image):
                try:
                    pre = prep(ct, label=lab)
                except UnreliablePlane as exc:
                    left_out[c.case_id] = f"{c.image}: {exc}"
                    progress.console.print(f"[yellow]left out of training:[/] {c.image}: {exc}", highlight=False)
                    progress.advance(task)
                    continue
            if cfg.align:
                found[c.case_id] = pre.alignment.to_dict()
            _save_npy(cache / f"{c.case_id}_image.npy", pre.image)
            _save_npy(cache / f"{c.case_id}_label.npy", pre.label)
            progress.advance(task)
    if len(left_out) == len(cases):
        raise SatsError(f"{dataset}: no training CT could be aligned (first: {next(iter(left_out.values()))}); try --no-align")
    write_text_atomic(meta_file, json.dumps({"key": _cache_key(files, spacing, stats, planes.key), "spacing": list(spacing),
                                             "stats": stats.to_dict(), "align": planes.key, "planes": found,
                                             "left_out": left_out}, indent=2))
    return _load_cache(cache, [c.case_id for c in cases if c.case_id not in left_out]), stats, spacing


def _load_cache(cache: Path, ids: list[str]) -> list[CaseArrays]:
    out = []
    for cid in ids:
        image = np.load(cache / f"{cid}_image.npy", mmap_mode="r", allow_pickle=False)
        label = np.load(cache / f"{cid}_label.npy", allow_pickle=False)
        out.append(CaseArrays(cid, image, label, np.argwhere(label > 0)))
    return out


# --- m_unsup and unlabelled CTs ------------------------------------------------------------------


def uses_asymmetry_maps(cfg: TrainConfig) -> bool:
    """Whether the labelled cases need m_unsup too: the margin loss takes its region from it
    (unlabelled CTs always have theirs)."""
    return cfg.margin_loss and cfg.asym_region == "unsupervised"


def unlabelled_inputs(dataset: Path, cfg: TrainConfig) -> list[tuple[str, Path]]:
    """``(case_id, path)`` of the unlabelled CTs: imagesTr entries without a label, then the
    images and DICOM series of ``cfg.unlabelled``."""
    from sats.data.io import collect_inputs

    cases = list_cases(dataset, "Tr")
    items = [(c.case_id, c.image) for c in cases if c.label is None]
    if cfg.unlabelled:
        items += collect_inputs(Path(cfg.unlabelled))[0]
    ids = [i for i, _ in items]
    clash = sorted({i for i in ids if ids.count(i) > 1} | (set(ids) & {c.case_id for c in cases if c.label is not None}))
    if clash:
        raise SatsError(f"{cfg.unlabelled or dataset}: unlabelled case id {clash[0]} is also another case's id")
    return items


def _asym_key(image: Path, spacing, align: str, extra: dict | None = None) -> str:
    from sats.geometry.asymmetry import AsymmetryConfig

    h = hashlib.sha256(json.dumps({"file": fingerprint(Path(image)), "spacing": list(spacing), "align": align,
                                   "asym": AsymmetryConfig().to_dict(), **(extra or {})}, sort_keys=True).encode())
    return h.hexdigest()[:16]


def add_asymmetry_maps(dataset: Path, cache: Path, cases: list[CaseArrays], cfg: TrainConfig, console: Console | None) -> None:
    """Give every labelled case its m_unsup (:mod:`sats.geometry.asymmetry`), computed once into
    the cache as ``{case}_asym.npy`` (keyed by file, grid, alignment and settings) and reused.
    The CT is resampled in HU about the plane stored in ``meta.json``: no second search."""
    from sats.geometry.asymmetry import asymmetry_map

    spacing = tuple(float(v) for v in cfg.spacing)  # type: ignore[union-attr]
    meta = json.loads((cache / "meta.json").read_text())
    keys_file = cache / "asym.json"
    keys = json.loads(keys_file.read_text()) if keys_file.exists() else {}
    images = {c.case_id: c.image for c in training_cases(dataset)}
    prep = Preprocessor(spacing, None, plane_settings(cfg))
    with progress_bar(console) as progress:
        task = progress.add_task("asymmetry maps (registration to the mirror)", total=len(cases))
        for case in cases:
            key = _asym_key(images[case.case_id], spacing, meta.get("align", ""))
            path = cache / f"{case.case_id}_asym.npy"
            if keys.get(case.case_id) != key or not path.exists():
                stored = meta.get("planes", {}).get(case.case_id)
                with about(images[case.case_id]):
                    pre = prep(read_image(images[case.case_id]), alignment=Alignment.from_dict(stored) if stored else None)
                    _save_npy(path, asymmetry_map(pre).mask)
                keys[case.case_id] = key
                write_text_atomic(keys_file, json.dumps(keys, indent=1))
            case.asym = np.load(path, allow_pickle=False)
            progress.advance(task)


def add_registered_mirrors(dataset: Path, cache: Path, cases: list[CaseArrays], cfg: TrainConfig, stats: IntensityStats,
                           console: Console | None) -> None:
    """Give every case its mirror registered to it (``fusion="registered"``), computed once
    into the cache as ``{case}_mirror.npy`` (normalised like the image, keyed by file, grid
    and alignment in ``mirror.json``): ``case.image`` becomes (2, z, y, x), the CT and
    W(M(CT)). The CT is resampled about the plane stored in ``meta.json``: no second search."""
    spacing = tuple(float(v) for v in cfg.spacing)  # type: ignore[union-attr]
    meta = json.loads((cache / "meta.json").read_text())
    keys_file = cache / "mirror.json"
    keys = json.loads(keys_file.read_text()) if keys_file.exists() else {}
    images = {c.case_id: c.image for c in training_cases(dataset)}
    prep = Preprocessor(spacing, stats, plane_settings(cfg), registered_mirror=True)
    with progress_bar(console) as progress:
        task = progress.add_task("mirrors registered to each CT", total=len(cases))
        for case in cases:
            key = _asym_key(images[case.case_id], spacing, meta.get("align", ""), {"registered_mirror": 1, "stats": stats.to_dict()})
            path = cache / f"{case.case_id}_mirror.npy"
            if keys.get(case.case_id) != key or not path.exists():
                stored = meta.get("planes", {}).get(case.case_id)
                with about(images[case.case_id]):
                    pre = prep(read_image(images[case.case_id]), alignment=Alignment.from_dict(stored) if stored else None)
                _save_npy(path, pre.mirror_reg)
                keys[case.case_id] = key
                write_text_atomic(keys_file, json.dumps(keys, indent=1))
            case.image = np.stack([np.asarray(case.image), np.load(path, allow_pickle=False)])
            progress.advance(task)


def prepare_unlabelled(items: list[tuple[str, Path]], cache: Path, cfg: TrainConfig, stats: IntensityStats,
                       console: Console | None) -> list[CaseArrays]:
    """Preprocess the unlabelled CTs with the run's alignment (self, atlas or none) and the
    labelled cases' intensity statistics, and compute their m_unsup, once, into ``cache``;
    a CT that cannot be aligned or read is left out with a warning. Resumable case by case.
    Each CT's plane is kept beside it (``{id}_plane.json``)."""
    from sats.data.dataset import check_ct
    from sats.geometry.asymmetry import asymmetry_map

    spacing = tuple(float(v) for v in cfg.spacing)  # type: ignore[union-attr]
    planes = plane_settings(cfg)
    registered = cfg.fusion == "registered"
    prep = Preprocessor(spacing, None, planes, registered_mirror=registered)  # in HU: m_unsup reads HU, normalised after
    cache.mkdir(parents=True, exist_ok=True)
    keys_file = cache / "unlabelled.json"
    keys = json.loads(keys_file.read_text()) if keys_file.exists() else {}
    out = []
    with progress_bar(console) as progress:
        task = progress.add_task("unlabelled CTs (align, preprocess, asymmetry)", total=len(items))
        for cid, path in items:
            key = _asym_key(path, spacing, planes.key, {"stats": stats.to_dict(), **({"registered_mirror": 1} if registered else {})})
            image_file, asym_file = cache / f"{cid}_image.npy", cache / f"{cid}_asym.npy"
            if keys.get(cid) != key or not (image_file.exists() and asym_file.exists()):
                try:
                    with about(path):
                        ct = read_image(path)
                        check_ct(ct, str(path))
                        pre = prep(ct)
                        channels = pre.channels  # the CT, and its registered mirror where the run takes one
                        _save_npy(image_file, (stats.normalise(channels) if registered else stats.normalise(pre.image)).astype(np.float32))
                        _save_npy(asym_file, asymmetry_map(pre).mask)
                        write_text_atomic(cache / f"{cid}_plane.json", json.dumps(pre.alignment.to_dict(), indent=1))
                except SatsError as exc:  # unreadable, not CT, or no reliable plane
                    progress.console.print(f"[yellow]unlabelled CT left out:[/] {exc}", highlight=False)
                    progress.advance(task)
                    continue
                keys[cid] = key
                write_text_atomic(keys_file, json.dumps(keys, indent=1))
            image = np.load(image_file, mmap_mode="r", allow_pickle=False)
            asym = np.load(asym_file, allow_pickle=False)
            out.append(CaseArrays(cid, image, np.zeros(asym.shape, np.uint8), np.argwhere(asym > 0), asym, labelled=False))
            progress.advance(task)
    return out
