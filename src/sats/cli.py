"""The ``sats`` command line: one command per pipeline stage.

Every command turns a :class:`sats.io.SatsError` into one line on stderr and exit code 1.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from sats.io import SatsError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Semantic-asymmetry GTV segmentation of nasopharyngeal carcinoma on planning CT.",
)
console = Console()
err_console = Console(stderr=True)


def _fail(message: str) -> None:
    err_console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(1)


def user_errors(func):
    """Report SatsError (and a few OS errors) as one line, no traceback."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except SatsError as exc:
            _fail(str(exc))
        except PermissionError as exc:
            _fail(f"{exc.filename}: permission denied")
        except KeyboardInterrupt:
            _fail("interrupted")

    return wrapper


@app.command()
@user_errors
def phantom(
    out: Path = typer.Argument(..., help="Output dataset folder (nnU-Net raw layout)."),
    cases: int = typer.Option(20, "--cases", min=0, help="Training cases (imagesTr/labelsTr)."),
    test_cases: int = typer.Option(0, "--test-cases", min=0, help="Test cases (imagesTs/labelsTs)."),
    seed: int = typer.Option(0, "--seed", help="Random seed; same seed, same dataset."),
    tumor_contrast: float = typer.Option(12.0, "--tumor-contrast", help="GTV minus muscle, HU."),
    bilateral_fraction: float = typer.Option(0.25, "--bilateral-fraction", min=0.0, max=1.0, help="Share of tumours crossing the midline."),
    max_angle: float = typer.Option(10.0, "--max-angle", min=0.0, help="Largest head yaw and roll, degrees."),
    max_shift: float = typer.Option(10.0, "--max-shift", min=0.0, help="Largest head shift, mm."),
    noise: float = typer.Option(20.0, "--noise", min=0.0, help="Scanner noise standard deviation, HU."),
    size: str = typer.Option("default", "--size", help="'default' (CPU-sized grid) or 'paper' (full-size volumes)."),
    tumor_free: bool = typer.Option(False, "--tumor-free", help="No tumour (for symmetry checks)."),
) -> None:
    """Write a synthetic head-and-neck planning-CT dataset with NPC GTV labels."""
    from sats.phantom import PhantomConfig, write_phantom_dataset

    config = PhantomConfig(
        tumor_contrast=tumor_contrast,
        bilateral_fraction=bilateral_fraction,
        max_angle=max_angle,
        max_shift=max_shift,
        noise=noise,
        size=size,
        tumor_free=tumor_free,
    )
    write_phantom_dataset(out, n_train=cases, n_test=test_cases, seed=seed, config=config, console=console)


@app.command()
@user_errors
def check(dataset: Path = typer.Argument(..., help="Dataset folder in nnU-Net v2 raw layout.")) -> None:
    """Validate a dataset: pairs, geometry, label values, CT intensities; print a per-case table."""
    from sats.dataset import check_dataset, print_report

    report = check_dataset(dataset)
    print_report(report, console=console, err_console=err_console)
    if report.problems:
        raise typer.Exit(1)


@app.command()
@user_errors
def evaluate(
    pred: Path = typer.Option(..., "--pred", help="Folder of predicted masks."),
    gt: Path = typer.Option(..., "--gt", help="Folder of reference masks."),
    csv: Optional[Path] = typer.Option(None, "--csv", help="Write per-case metrics here."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="Write a per-case Dice bar plot (PNG)."),
    tolerance: float = typer.Option(1.0, "--nsd-tolerance", help="NSD tolerance, mm."),
) -> None:
    """DSC, HD95, ASD and NSD of predictions against references, matched by case id."""
    from sats.evaluation import evaluate_folders, plot_dice, print_summary, write_csv

    results = evaluate_folders(pred, gt, nsd_tolerance_mm=tolerance, console=console)
    if csv is not None:
        write_csv(results, csv)
    if plot is not None:
        plot_dice(results, plot)
    print_summary(results, console=console)


@app.command()
@user_errors
def demo(
    out: Path = typer.Option(Path("demo"), "--out", help="Folder for everything the demo writes."),
    quick: bool = typer.Option(False, "--quick", help="A smaller, faster run (for tests)."),
) -> None:
    """End to end on the embedded phantom: generate, check, evaluate."""
    from sats.dataset import check_dataset, print_report
    from sats.evaluation import evaluate_folders, print_summary, write_csv
    from sats.phantom import PhantomConfig, write_phantom_dataset

    data = out / "dataset"
    n_train, n_test = (4, 2) if quick else (20, 10)
    console.rule("1. phantom dataset")
    write_phantom_dataset(data, n_train=n_train, n_test=n_test, seed=0, config=PhantomConfig(), console=console)
    console.rule("2. dataset check")
    report = check_dataset(data)
    print_report(report, console=console, err_console=err_console)
    if report.problems:
        raise SatsError(f"{data}: the generated dataset failed its check")
    console.rule("3. evaluation of the reference against itself")
    results = evaluate_folders(data / "labelsTs", data / "labelsTs", console=console)
    write_csv(results, out / "results.csv")
    print_summary(results, console=console)


def main() -> None:  # pragma: no cover - console entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
