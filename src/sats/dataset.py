"""Provisional minimal dataset layout module (to be replaced by the full checker)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from sats.io import SatsError, is_image_file, strip_suffix


@dataclass
class Case:
    case_id: str
    image: Path
    label: Path | None


def load_dataset_json(root: Path) -> dict:
    path = Path(root) / "dataset.json"
    if not path.exists():
        raise SatsError(f"{path}: missing")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise SatsError(f"{path}: invalid JSON ({exc.msg})") from None


def list_cases(root: Path, split: str = "Tr") -> list[Case]:
    root = Path(root)
    images = root / f"images{split}"
    labels = root / f"labels{split}"
    out = []
    for f in sorted(images.iterdir()) if images.exists() else []:
        if not is_image_file(f):
            continue
        stem = strip_suffix(f.name)
        cid = stem[:-5] if stem.endswith("_0000") else stem
        lab = next((p for p in labels.glob(f"{cid}.*") if is_image_file(p)), None) if labels.exists() else None
        out.append(Case(cid, f, lab))
    return out
