"""The end-to-end demo on the embedded phantom (``sats demo``, ``make demo``).

Writes to OUT: ``dataset/`` (phantom, nnU-Net layout), ``model/`` (a RUN folder usable by
``sats predict -m OUT/model``), ``predictions/``, ``results.csv``, ``dice.png``,
``overlays/{case}.png`` and ``asymmetry_{case}.png`` for the first test case.
"""

from __future__ import annotations

import time
from pathlib import Path

from rich.console import Console

from sats.data.dataset import check_dataset, list_cases, print_report
from sats.data.io import read_image
from sats.data.phantom import PhantomConfig, write_phantom_dataset
from sats.evaluation.figures import asymmetry_png, overlay_png
from sats.evaluation.metrics import evaluate_folders, plot_dice, print_summary, write_csv
from sats.geometry.volume import SatsError
from sats.model.config import build
from sats.model.training import train
from sats.predict.inference import load_run, predict_case, predict_paths


def run_demo(out: Path, quick: bool = False, console: Console | None = None) -> list:
    """Phantom -> check -> train (cpu preset, both stages) -> predict -> evaluate -> figures."""
    console = console or Console()
    t0 = time.time()
    out = Path(out)
    data, run, preds = out / "dataset", out / "model", out / "predictions"
    n_train, n_test = (6, 2) if quick else (20, 10)

    console.rule("1/5 phantom dataset")
    write_phantom_dataset(data, n_train=n_train, n_test=n_test, seed=0, config=PhantomConfig(), console=console)
    report = check_dataset(data)
    print_report(report, console=console, err_console=console)
    if report.problems:
        raise SatsError(f"{data}: the generated dataset failed its check")

    console.rule("2/5 training (cpu preset, stage 1 then stage 2)")
    quick_options = dict(stage1_epochs=3, stage2_epochs=1, iters_per_epoch=8, patch_size=(16, 64, 64), base_features=4, max_features=32)
    cfg = build("cpu", **(quick_options if quick else {}))
    train(data, run, cfg, device="cpu", console=console)

    console.rule("3/5 prediction of the test set")
    predict_paths(data / "imagesTs", preds, run, console=console)

    console.rule("4/5 evaluation")
    results = evaluate_folders(preds, data / "labelsTs", console=console)
    write_csv(results, out / "results.csv")
    plot_dice(results, out / "dice.png")
    print_summary(results, console=console)

    console.rule("5/5 figures")
    loaded = load_run(run)
    for i, case in enumerate(list_cases(data, "Ts")):
        ct, ref = read_image(case.image), read_image(case.label)  # type: ignore[arg-type]
        pred = read_image(preds / f"{case.case_id}.nii.gz")
        overlay_png(ct, ref.array > 0, pred.array > 0, out / "overlays" / f"{case.case_id}.png", title=case.case_id)
        if i == 0 and loaded.has_head:
            asym = predict_case(loaded, ct, asymmetry_map=True)
            asymmetry_png(ct, asym.asymmetry.array, out / f"asymmetry_{case.case_id}.png", pred.array > 0,
                          title=f"{case.case_id}: what the model finds asymmetric")
    console.print(f"[bold green]demo finished[/] in {(time.time() - t0) / 60:.1f} min; everything is in {out}/")
    return results
