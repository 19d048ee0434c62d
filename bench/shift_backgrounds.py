"""Link the background CTs of a lesion test bed's test split into a new background dataset.

    python bench/shift_backgrounds.py TESTBED BACKGROUND OUT

OUT/imagesTs holds links to the CTs (from BACKGROUND/imagesTr or imagesTs) that TESTBED's
test cases were made from; OUT/imagesTr one CT that TESTBED trained on (a test bed needs a
training split; the study never scores it). `sats phantom OUT2 --background OUT --seed S`
then puts new lesions into the very CTs the first test bed tests on, and none it trained on.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path


def main(testbed: Path, background: Path, out: Path) -> None:
    lesions = json.loads((testbed / "lesions.json").read_text())
    test = sorted(v["source"] for k, v in lesions.items() if k.startswith("npc_test_"))
    train = sorted(v["source"] for k, v in lesions.items() if not k.startswith("npc_test_"))

    def source(name: str) -> Path:
        for split in ("imagesTs", "imagesTr"):
            if (background / split / name).exists():
                return (background / split / name).resolve()
        raise SystemExit(f"{background}: no {name} in imagesTr or imagesTs")

    for split, names in (("imagesTs", test), ("imagesTr", train[:1])):
        (out / split).mkdir(parents=True, exist_ok=True)
        for name in names:
            link = out / split / name
            if not link.exists():
                link.symlink_to(source(name))
    print(f"{out}: {len(test)} test CTs of {testbed}, 1 training CT")


if __name__ == "__main__":
    if len(sys.argv) != 4:
        raise SystemExit(__doc__)
    main(*(Path(a) for a in sys.argv[1:]))
