"""The ``sats`` command line: one command per pipeline stage.

Every command turns a :class:`sats.data.io.SatsError` into one line on stderr and exit code 1.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from sats.geometry.volume import SatsError
from sats.hardware import use_available_cores

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


@app.callback()
def _start() -> None:
    """Every command: one thread per core this process may use (sats.hardware)."""
    use_available_cores()


@app.command()
@user_errors
def phantom(
    out: Path = typer.Argument(..., help="Output dataset folder (nnU-Net raw layout)."),
    cases: int = typer.Option(20, "--cases", min=0, help="Training cases (imagesTr/labelsTr)."),
    test_cases: int = typer.Option(0, "--test-cases", min=0, help="Test cases (imagesTs/labelsTs)."),
    seed: int = typer.Option(0, "--seed", help="Random seed; same seed, same dataset."),
    background: Optional[Path] = typer.Option(None, "--background", help="Real CTs to insert GTVs into: a folder of CT images, or a dataset (its imagesTr for training cases, imagesTs for test cases)."),
    tumor_contrast: Optional[float] = typer.Option(None, "--tumor-contrast", help="GTV minus muscle, HU (default 12; with --background drawn from 0-15 per case)."),
    bilateral_fraction: Optional[float] = typer.Option(None, "--bilateral-fraction", min=0.0, max=1.0, help="Share of tumours crossing the midline (default 0.25; 0.2 with --background)."),
    contrast_range: Optional[tuple[float, float]] = typer.Option(None, "--contrast-range", help="With --background: draw each GTV's contrast (HU above muscle) uniformly from LO HI (default 0 15); --tumor-contrast fixes it instead."),
    volume_ml: Optional[tuple[float, float]] = typer.Option(None, "--volume-ml", help="With --background: GTV volume range LO HI in ml, drawn log-uniformly (default 5 60)."),
    max_angle: Optional[float] = typer.Option(None, "--max-angle", min=0.0, help="Largest head yaw and roll, degrees (default 10)."),
    max_shift: Optional[float] = typer.Option(None, "--max-shift", min=0.0, help="Largest head shift, mm (default 10)."),
    noise: Optional[float] = typer.Option(None, "--noise", min=0.0, help="Scanner noise standard deviation, HU (default 20)."),
    size: Optional[str] = typer.Option(None, "--size", help="'default' (CPU-sized grid) or 'paper' (full-size volumes)."),
    tumor_free: bool = typer.Option(False, "--tumor-free", help="No tumour (for symmetry checks)."),
) -> None:
    """Write a synthetic head-and-neck planning-CT dataset with NPC GTV labels, or (with
    --background) real CTs with inserted NPC-like GTVs."""
    if background is not None:
        from sats.data.lesion import LesionConfig, write_lesion_dataset

        analytic_only = {"--max-angle": max_angle, "--max-shift": max_shift, "--noise": noise, "--size": size,
                         "--tumor-free": tumor_free or None}
        given = [k for k, v in analytic_only.items() if v is not None]
        if given:
            raise SatsError(f"{', '.join(given)}: options of the analytic phantom, not used with --background")
        if contrast_range is not None and tumor_contrast is not None:
            raise SatsError("--tumor-contrast and --contrast-range: give one (a fixed contrast, or a range to draw from)")
        config = LesionConfig(
            tumor_contrast=tumor_contrast,
            contrast_range=tuple(contrast_range) if contrast_range else (0.0, 15.0),
            bilateral_fraction=0.2 if bilateral_fraction is None else bilateral_fraction,
            volume_ml=tuple(volume_ml) if volume_ml else (5.0, 60.0),
        )
        result = write_lesion_dataset(out, background, n_train=cases, n_test=test_cases, seed=seed, config=config, console=console)
        console.print(f"{out}: {result['train']} training and {result['test']} test cases from {result['backgrounds']} "
                      f"background CT(s); {result['skipped']} not used (reasons in skipped.json)")
        for split, got, wanted in (("training", result["train"], cases), ("test", result["test"], test_cases)):
            if got < wanted:
                err_console.print(f"[yellow]warning:[/] only {got} of {wanted} {split} cases: too few usable background CTs")
        return
    if volume_ml is not None or contrast_range is not None:
        raise SatsError("--volume-ml, --contrast-range: only with --background (the analytic phantom sets its GTV itself)")
    from sats.data.phantom import PhantomConfig, write_phantom_dataset

    config = PhantomConfig(
        tumor_contrast=12.0 if tumor_contrast is None else tumor_contrast,
        bilateral_fraction=0.25 if bilateral_fraction is None else bilateral_fraction,
        max_angle=10.0 if max_angle is None else max_angle,
        max_shift=10.0 if max_shift is None else max_shift,
        noise=20.0 if noise is None else noise,
        size=size or "default",
        tumor_free=tumor_free,
    )
    write_phantom_dataset(out, n_train=cases, n_test=test_cases, seed=seed, config=config, console=console)


@app.command()
@user_errors
def check(dataset: Path = typer.Argument(..., help="Dataset folder in nnU-Net v2 raw layout.")) -> None:
    """Validate a dataset: pairs, geometry, label values, CT intensities; print a per-case table."""
    from sats.data.dataset import check_dataset, print_report

    report = check_dataset(dataset, console=err_console)  # progress bar on stderr, table on stdout
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
    from sats.evaluation.metrics import evaluate_folders, plot_dice, print_summary, write_csv

    results = evaluate_folders(pred, gt, nsd_tolerance_mm=tolerance, console=console)
    if csv is not None:
        write_csv(results, csv)
    if plot is not None:
        plot_dice(results, plot)
    print_summary(results, console=console)


@app.command()
@user_errors
def summary(
    preset_name: str = typer.Option("paper", "--preset", help="paper or cpu."),
    arch: str = typer.Option("nnunet", "--arch", help="Backbone: nnunet, swinunetr, swinunetr-v2, unetr, mednext, stunet-s, stunet-b, stunet-l, resenc-m, resenc-l, umamba-bot, transunet."),
    patch: Optional[tuple[int, int, int]] = typer.Option(None, "--patch", help="Patch D H W (z y x voxels)."),
    spacing: Optional[tuple[float, float, float]] = typer.Option(None, "--spacing", help="Spacing Z Y X in mm."),
) -> None:
    """Print the planned encoder-decoder stage by stage, its parameter count and the GFLOP of a training step."""
    from rich.table import Table

    from sats.model.backbones import backbone, build_on_meta, plan_backbone, step_gflop, train_patch
    from sats.model.config import build
    from sats.model.network import count_parameters

    cfg = build(preset_name, arch=arch)
    sp = tuple(spacing) if spacing else (cfg.spacing or (3.0, 1.0, 1.0))
    asked = tuple(patch) if patch else cfg.patch_size
    patch_size = train_patch(arch, asked, sp)
    try:
        plan = plan_backbone(arch, patch_size, sp, cfg.preset, cfg.base_features, cfg.max_features)
    except ValueError as exc:
        raise SatsError(str(exc)) from None
    model = build_on_meta(plan, residual=cfg.residual)  # shapes only: the paper's STU-Net L has 440 M weights
    table = Table(title=f"{arch} encoder-decoder, preset {cfg.preset}: patch {plan.patch_size} at {sp} mm (z, y, x)")
    for col in ("stage", "features", "kernel (z,y,x)", "stride (z,y,x)", "feature map (z,y,x)"):
        table.add_column(col)
    size = list(plan.patch_size)
    for i, (f, k, st) in enumerate(zip(plan.features, plan.kernel_sizes, plan.strides)):
        size = [a // b for a, b in zip(size, st)]
        table.add_row(str(i), str(f), "x".join(map(str, k)), "x".join(map(str, st)), "x".join(map(str, size)))
    console.print(table)
    if plan.patch_size != tuple(asked):
        grown = "grown to" if backbone(arch).patch_volume != 1.0 else "rounded up to"
        console.print(f"patch {tuple(asked)} {grown} {plan.patch_size} for {arch}")
    n = count_parameters(model)
    console.print(f"GFLOP per training step (batch {cfg.batch_size}, forward + backward): "
                  f"{step_gflop(plan, cfg.batch_size, net=model):.1f}")
    console.print(f"parameters: {n:,}")


@app.command()
@user_errors
def train(
    dataset: Path = typer.Argument(..., help="Dataset folder in nnU-Net v2 raw layout."),
    out: Path = typer.Option(..., "--out", "-o", help="RUN folder to write."),
    preset_name: str = typer.Option("paper", "--preset", help="paper (the paper's configuration) or cpu."),
    stage: str = typer.Option("all", "--stage", help="1, 2 or all."),
    epochs: Optional[int] = typer.Option(None, "--epochs", min=1, help="Total epochs; split 4:1 between the stages like 800:200."),
    iters_per_epoch: Optional[int] = typer.Option(None, "--iters-per-epoch", min=1),
    fold: str = typer.Option("0", "--fold", help="0-4, or all (no validation)."),
    folds: Optional[str] = typer.Option(None, "--folds", help="Train these folds into RUN/fold_K (e.g. 0,1,2,3,4; each resumable), predict each fold's held-out cases and fit the quality model on them (RUN/quality.json); `sats predict -m RUN` averages the folds."),
    resume: bool = typer.Option(False, "--resume", help="Continue from RUN/checkpoint.pt."),
    variant: Optional[str] = typer.Option(None, "--variant", help="A variant of sats ablation, e.g. unet, fusion, fusion-reg, feature-fusion, sats-joint-union, sats."),
    arch: Optional[str] = typer.Option(None, "--arch", help="Backbone: nnunet (default, the paper's network), swinunetr, swinunetr-v2, unetr, mednext, stunet-s, stunet-b, stunet-l, resenc-m, resenc-l, umamba-bot, transunet."),
    spacing: Optional[tuple[float, float, float]] = typer.Option(None, "--spacing", help="Training spacing Z Y X mm (default: the preset's, following the data where it is coarser)."),
    patch_size: Optional[tuple[int, int, int]] = typer.Option(None, "--patch-size", help="Patch D H W voxels."),
    no_projection_head: bool = typer.Option(False, "--no-projection-head", help="Ablation: margin loss on the decoder features."),
    no_margin: bool = typer.Option(False, "--no-margin", help="Ablation: no margin loss (stage 2 fine-tunes Dice + BCE only)."),
    asym_region: Optional[str] = typer.Option(None, "--asym-region", help="paper (Eq. 1: s - s∩s'), union (s XOR s') or unsupervised (m_unsup from registration to the mirror, no label needed)."),
    unlabelled: Optional[Path] = typer.Option(None, "--unlabelled", help="Folder of unlabelled CTs (images or DICOM series) for the margin loss; imagesTr entries without a label join them."),
    unlabelled_fraction: Optional[float] = typer.Option(None, "--unlabelled-fraction", min=0.0, max=0.99, help="Share of each batch from unlabelled CTs in the margin-loss stages (default 0.5)."),
    beta: Optional[float] = typer.Option(None, "--beta", help="Weight of the margin loss."),
    margin: Optional[float] = typer.Option(None, "--margin", help="Margin t of the hinge."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", min=1),
    workers: Optional[int] = typer.Option(None, "--workers", min=0, help="Data-loading processes (default: up to 8 on CUDA, none on CPU)."),
    seed: int = typer.Option(0, "--seed"),
    cache: Optional[Path] = typer.Option(None, "--cache", help="Preprocessed-case cache (default RUN/cache)."),
    no_align: bool = typer.Option(False, "--no-align", help="Skip the mid-sagittal alignment (mirror about the grid centre)."),
    atlas: Optional[Path] = typer.Option(None, "--atlas", help="Find each plane by affine registration to this symmetric atlas."),
    device: Optional[str] = typer.Option(None, "--device", help="cpu or cuda (default: cuda when available)."),
    fp32: bool = typer.Option(False, "--fp32", help="Train in fp32 (default: bf16 autocast on CUDA and on CPUs with native bf16, AMX or AVX512-BF16)."),
    compile_net: bool = typer.Option(False, "--compile", help="CUDA: torch.compile the encoder-decoder (2.1x the steps/s of a paper-preset step on an H200; the first steps wait for compilation)."),
) -> None:
    """Train SATs: stage 1 (Siamese encoder-decoder), stage 2 (projection head + margin loss)."""
    from sats.model.config import build, parse_fold
    from sats.model.training import train as run_training

    if unlabelled is not None and not unlabelled.is_dir():
        raise SatsError(f"{unlabelled}: --unlabelled needs a folder of CTs")
    given = {
        "iters_per_epoch": iters_per_epoch, "unlabelled_fraction": unlabelled_fraction, "beta": beta, "margin": margin,
        "batch_size": batch_size, "num_workers": workers, "asym_region": asym_region, "arch": arch,
        "patch_size": tuple(patch_size) if patch_size else None,
        "unlabelled": str(unlabelled.resolve()) if unlabelled else None,
        "atlas": str(atlas.resolve()) if atlas else None,
        **({"spacing": tuple(spacing), "follow_data": False} if spacing else {}),
        **({"projection_head": False} if no_projection_head else {}), **({"margin_loss": False} if no_margin else {}),
        **({"align": False} if no_align else {}), **({"compile": True} if compile_net else {}), **({"amp": False} if fp32 else {}),
    }
    cfg = build(preset_name, variant=variant, epochs=epochs, fold=parse_fold(fold), seed=seed,
                **{k: v for k, v in given.items() if v is not None})
    if folds is not None:
        from sats.evaluation.crossval import train_folds

        if stage != "all" or fold != "0":
            raise SatsError("--folds trains whole folds: drop --stage and --fold (each fold resumes by itself)")
        train_folds(dataset, out, cfg, _int_list(folds, "--folds"), cache=cache, device=device, console=console)
        return
    run_training(dataset, out, cfg, stage=stage, resume=resume, cache=cache, device=device, console=console)


def _int_list(text: str, what: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise SatsError(f"{what} must be comma-separated integers, not {text!r}") from None


@app.command()
@user_errors
def ablation(
    dataset: Path = typer.Argument(..., help="Dataset in nnU-Net raw layout with imagesTs/labelsTs (the test split)."),
    out: Path = typer.Option(..., "--out", "-o", help="Study folder (resumed when it exists)."),
    preset_name: str = typer.Option("cpu", "--preset", help="paper or cpu."),
    variants: Optional[str] = typer.Option(None, "--variants", help="Comma-separated variants (default: unet,fusion,fusion-reg,feature-fusion,sats-joint-union,sats)."),
    archs: str = typer.Option("nnunet", "--archs", help="Comma-separated backbones; each variant runs on each (arm variant@arch), paired against unet on nnunet."),
    test_dataset: Optional[Path] = typer.Option(None, "--test-dataset", help="Also score every run on this dataset's test split (cross-domain; DIR/cross/)."),
    seeds: str = typer.Option("0,1,2,3,4", "--seeds", help="Comma-separated seeds (10 for a headline comparison)."),
    fold: str = typer.Option("0", "--fold", help="0-4, or all (no validation)."),
    epochs: Optional[int] = typer.Option(None, "--epochs", min=1, help="Total epochs per run (split 4:1 between the stages)."),
    iters_per_epoch: Optional[int] = typer.Option(None, "--iters-per-epoch", min=1),
    spacing: Optional[tuple[float, float, float]] = typer.Option(None, "--spacing", help="Training spacing Z Y X mm (default: the preset's, following the data where it is coarser)."),
    patch_size: Optional[tuple[int, int, int]] = typer.Option(None, "--patch-size", help="Patch D H W voxels."),
    no_align: bool = typer.Option(False, "--no-align", help="Skip the mid-sagittal alignment (mirror about the grid centre)."),
    device: Optional[str] = typer.Option(None, "--device", help="cpu or cuda (default: cuda when available)."),
    unlabelled: Optional[Path] = typer.Option(None, "--unlabelled", help="Unlabelled CTs for the sats-semi and sats-semi-joint variants."),
    ray: Optional[str] = typer.Option(None, "--ray", help="Run each (arm, seed) as a task on a Ray cluster: auto (the cluster this machine is in), local, or ray://HOST:PORT; DIR and the datasets must be on storage every node mounts at the same path."),
    ray_cpus: int = typer.Option(1, "--ray-cpus", min=1, help="With --ray on CPU: cores each run asks for (and uses); on CUDA each run asks for one GPU."),
) -> None:
    """Train, predict and evaluate each variant x seed; paired statistics over seeds and cases against unet.
    One schedule for every arm: unet, fusion ([CT, mirror] input), fusion-reg (the mirror registered to the CT),
    feature-fusion (each voxel's features beside its mirror partner's), siamese, sats-joint, sats-joint-union;
    the paper's two stages: sats, unet-2stage, siamese-2stage, margin-no-head-2stage; sats-unsup (margin-loss
    region from registration, no label), sats-semi and sats-semi-joint (plus --unlabelled CTs)."""
    from sats.evaluation.ablation import DEFAULT_VARIANTS, AblationSettings, run_ablation

    settings = AblationSettings(
        dataset=str(dataset.resolve()), preset=preset_name, variants=[v.strip() for v in (variants or ",".join(DEFAULT_VARIANTS)).split(",") if v.strip()],
        seeds=_int_list(seeds, "--seeds"), fold=fold, epochs=epochs, iters_per_epoch=iters_per_epoch,
        spacing=list(spacing) if spacing else None, patch_size=list(patch_size) if patch_size else None,
        align=not no_align, unlabelled=str(unlabelled.resolve()) if unlabelled else None,
        archs=[a.strip() for a in archs.split(",") if a.strip()],
        test_dataset=str(test_dataset.resolve()) if test_dataset else None,
    )
    if ray is not None:
        from sats.cluster import run_study_on_ray

        import torch

        run_study_on_ray(settings, out, ray, device or ("cuda" if torch.cuda.is_available() else "cpu"), ray_cpus, console)
    else:
        run_ablation(settings, out, console=console, device=device)
    console.print(f"[bold green]done[/]: {out / 'summary.md'}, {out / 'cases.csv'}, {out / 'ablation.png'}")


@app.command()
@user_errors
def predict(
    input_path: Path = typer.Option(..., "--input", "-i", help="Image file, DICOM series folder, or a folder of either."),
    output: Path = typer.Option(..., "--output", "-o", help="Mask file for one input (RS.dcm / SEG.dcm with --format rtstruct / seg), folder for many."),
    model: list[Path] = typer.Option(..., "--model", "-m", help="RUN folder written by `sats train` (a RUN of --folds: every fold, averaged); give -m several times to ensemble several RUNs."),
    tta: bool = typer.Option(False, "--tta", help="Average with the left-right mirrored prediction."),
    precision: str = typer.Option("auto", "--precision", help="fp32, bf16 (autocast), or auto: bf16 on CPUs with native bf16 (AMX, AVX512-BF16), else fp32."),
    roi: str = typer.Option("auto", "--roi", help="auto: run the network over the region of interest only (the RUN's localiser, else anatomical landmarks); whole: over the whole body."),
    step: float = typer.Option(0.5, "--step", min=0.05, max=1.0, help="Window step as a fraction of the patch (0.5 = 50% overlap)."),
    device: Optional[str] = typer.Option(None, "--device", help="cpu or cuda (default: cuda when available)."),
    save_probabilities: bool = typer.Option(False, "--save-probabilities", help="Also write {case}_probabilities."),
    asymmetry_map: bool = typer.Option(False, "--asymmetry-map", help="Also write {case}_asymmetry: ||g(E) - g(E')|| per voxel."),
    fmt: str = typer.Option("nifti", "--format", help="One or more, comma-separated: nifti (mask image), rtstruct (RT Structure Set, ROI GTVp), seg (DICOM SEG), sc (the review sheet as DICOM Secondary Capture); the DICOM ones need DICOM CT input."),
    series: Optional[str] = typer.Option(None, "--series", help="SeriesInstanceUID of the CT series in a DICOM folder holding several (default: the CT series with most slices)."),
    all_components: bool = typer.Option(False, "--all-components", help="Keep every predicted island (default: the largest connected region only)."),
    no_qa: bool = typer.Option(False, "--no-qa", help="Skip the quality check (no mirrored pass, no {case}_qa.json, no review sheet, no flag)."),
    ray: Optional[str] = typer.Option(None, "--ray", help="Predict a folder on a Ray cluster: auto, local or ray://HOST:PORT; inputs, RUN and OUTPUT on storage every node mounts at the same path."),
    ray_workers: int = typer.Option(2, "--ray-workers", min=1, help="With --ray: actors, each holding the model."),
    ray_cpus: int = typer.Option(1, "--ray-cpus", min=1, help="With --ray on CPU: cores each actor asks for (and uses); on CUDA one GPU each."),
) -> None:
    """Segment the GTV of one CT or a folder of CTs; masks keep each input's exact geometry. Each case gets a
    verdict, ok or review, in {case}_qa.json, a review sheet {case}_review.png, and the flag in the DICOM objects."""
    from sats.predict.inference import PredictOptions, predict_paths

    import torch

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    options = PredictOptions(device=device, precision=precision, roi=roi, overlap=1.0 - step, tta=tta,  # type: ignore[arg-type]
                             largest_component=not all_components, save_probabilities=save_probabilities,
                             asymmetry_map=asymmetry_map, fmt=fmt, series_uid=series, quality=not no_qa)  # type: ignore[arg-type]
    if ray is not None:
        from sats.cluster import predict_on_ray

        done, failed = predict_on_ray(input_path, output, list(model), options, ray, ray_workers, ray_cpus, console)
    else:
        done, failed = predict_paths(input_path, output, list(model), options, console=console)
    if failed:
        _fail(f"{failed} of {done + failed} case(s) failed; the other {done} were written")


@app.command()
@user_errors
def rtstruct(
    mask: Path = typer.Option(..., "--mask", help="Mask image on the CT's grid (non-zero = inside), e.g. a `sats predict` output."),
    ct: Path = typer.Option(..., "--ct", help="Folder of the DICOM CT series the mask was made on."),
    out: Path = typer.Option(..., "--out", "-o", help="RTSTRUCT file to write (e.g. RS.dcm)."),
    name: str = typer.Option("GTVp", "--name", help="ROI name."),
    color: str = typer.Option("255,0,0", "--color", help="ROI display colour R,G,B (0-255)."),
    series: Optional[str] = typer.Option(None, "--series", help="SeriesInstanceUID of the CT series (default: the CT series with most slices)."),
) -> None:
    """Write a mask as a DICOM RT Structure Set referencing its CT series (one GTV ROI)."""
    from sats.data.io import read_image
    from sats.predict.export import check_roi_name, parse_color, write_rtstruct

    rgb = parse_color(color)
    check_roi_name(name)
    volume = read_image(mask)
    n = write_rtstruct(volume, ct, out, roi_name=name, color=rgb, series_uid=series, mask_name=str(mask))
    empty = " (empty mask: the ROI has no contours)" if n == 0 else ""
    console.print(f"{out}: ROI {name!r}, {n} contour(s){empty}", highlight=False)


@app.command()
@user_errors
def align(
    input_path: Path = typer.Option(..., "--input", "-i", help="CT image file or DICOM series folder."),
    output: Path = typer.Option(..., "--output", "-o", help="Aligned CT (image file)."),
    atlas: Optional[Path] = typer.Option(None, "--atlas", help="Symmetric atlas (from `sats make-atlas`): affine mode."),
    transform: Optional[Path] = typer.Option(None, "--transform", help="Write the rigid transform here (ITK .tfm; aligned -> input points)."),
    plane_json: Optional[Path] = typer.Option(None, "--plane-json", help="Write the plane and symmetry scores here."),
    method: str = typer.Option("symmetry", "--method", help="symmetry (plane search, default) or registration (CT to its mirror, SimpleITK)."),
) -> None:
    """Find the mid-sagittal plane and resample the CT so it is the grid's central sagittal plane."""
    import SimpleITK as sitk

    import json

    from sats.data.dataset import check_ct
    from sats.data.io import atomic_path, read_image, write_image, write_text_atomic
    from sats.geometry.alignment import aligned_volume
    from sats.geometry.preprocessing import PlaneSettings, estimate_plane

    settings = PlaneSettings("atlas" if atlas else "self", str(atlas.resolve()) if atlas else None, method)  # type: ignore[arg-type]
    ct = read_image(input_path)
    check_ct(ct, str(input_path))
    result = estimate_plane(ct, settings)
    aligned, tfm = aligned_volume(ct, result.plane)
    write_image(aligned, output)
    if transform is not None:
        with atomic_path(transform, suffix=".tfm") as tmp:
            sitk.WriteTransform(tfm, str(tmp))
    if plane_json is not None:
        write_text_atomic(plane_json, json.dumps(result.to_dict(), indent=2))
    n, p = result.plane.normal, result.plane.point
    console.print(
        f"plane normal ({n[0]:.4f}, {n[1]:.4f}, {n[2]:.4f}), point ({p[0]:.1f}, {p[1]:.1f}, {p[2]:.1f}) mm LPS; "
        f"symmetry {result.score_before:.3f} before, {result.score_after:.3f} after; {result.seconds:.1f} s -> {output}"
    )


@app.command()
@user_errors
def asymmetry(
    input_path: Path = typer.Option(..., "--input", "-i", help="CT image file or DICOM series folder."),
    output: Path = typer.Option(..., "--output", "-o", help="m_unsup (0/1 image) on the CT's grid."),
    score: Optional[Path] = typer.Option(None, "--score", help="Also write the soft asymmetry score (float image) here."),
    spacing: tuple[float, float, float] = typer.Option((2.0, 2.0, 2.0), "--spacing", help="Grid (z y x mm) on which the CT is registered to its mirror."),
) -> None:
    """Where a CT differs from its own mirror, without a label (paper Sec. 3.1, registration-based)."""
    from sats.data.dataset import check_ct
    from sats.data.io import read_image, write_image
    from sats.geometry.asymmetry import asymmetry_on_input_grid

    ct = read_image(input_path)
    check_ct(ct, str(input_path))
    mask, soft, seconds = asymmetry_on_input_grid(ct, spacing)
    write_image(mask, output)
    if score is not None:
        write_image(soft, score)
    ml = float(mask.array.sum()) * mask.voxel_volume_ml
    console.print(f"asymmetric region {ml:.1f} ml ({seconds:.1f} s) -> {output}" + (f", score -> {score}" if score else ""))


@app.command()
@user_errors
def serve(
    model: Optional[list[Path]] = typer.Option(None, "--model", "-m", help="RUN folder written by `sats train` (a RUN of --folds: every fold, averaged); several -m: one ensemble."),
    store: Optional[Path] = typer.Option(None, "--store", help="Folder for received series, results and the job queue."),
    ae_title: str = typer.Option("SATS", "--ae-title", help="This node's AE title."),
    port: int = typer.Option(11112, "--port", min=1, max=65535, help="TCP port to listen on."),
    host: str = typer.Option("0.0.0.0", "--host", help="Address to listen on (127.0.0.1: this machine only)."),
    send_to: Optional[str] = typer.Option(None, "--send-to", help="Push each result by C-STORE to AE@HOST:PORT (the planning system)."),
    fmt: str = typer.Option("rtstruct", "--format", help="rtstruct (RT Structure Set, ROI GTV) or seg (DICOM SEG)."),
    workers: int = typer.Option(1, "--workers", min=1, max=8, help="Series predicted at once (one model in memory, shared)."),
    allow: Optional[str] = typer.Option(None, "--allow", help="Comma-separated calling AE titles allowed to send; others are rejected at association."),
    settle: float = typer.Option(10.0, "--settle", min=0.5, help="A series is complete this many seconds after its last instance (or when its association is released)."),
    send_tries: int = typer.Option(5, "--send-tries", min=1, help="Tries to send a result (back-off 2 s, doubling) before the job is marked failed."),
    device: Optional[str] = typer.Option(None, "--device", help="cpu or cuda (default: cuda when available)."),
    log_level: str = typer.Option("INFO", "--log-level", help="DEBUG, INFO or WARNING. Logs name UIDs; only DEBUG adds patient IDs, never names."),
    status: Optional[Path] = typer.Option(None, "--status", help="Print the job queue of this store folder and exit."),
    retry: Optional[Path] = typer.Option(None, "--retry", help="Queue this store folder's failed jobs again (send, or predict) and exit."),
) -> None:
    """Run a DICOM node: receive CT series (C-STORE), predict the GTV, send the RTSTRUCT back."""
    from sats.predict.serve import Destination, JobQueue, ServeOptions, status_table
    from sats.predict.serve import serve as run_node

    if status is not None:
        console.print(status_table(status))
        return
    if retry is not None:
        if not (retry / "queue.sqlite").exists():
            raise SatsError(f"{retry}: no job queue here (not a `sats serve --store` folder)")
        queue = JobQueue(retry)
        n = queue.retry_failed()
        queue.close()
        console.print(f"{n} failed job(s) queued again; a running node (or the next start) takes them")
        return
    if not model or store is None:
        raise SatsError("sats serve needs --model RUN and --store DIR (or --status DIR / --retry DIR)")
    if fmt not in ("rtstruct", "seg"):
        raise SatsError(f"--format {fmt!r}: use rtstruct or seg")
    if log_level.upper() not in ("DEBUG", "INFO", "WARNING"):
        raise SatsError(f"--log-level {log_level!r}: use DEBUG, INFO or WARNING")
    import torch

    titles = tuple(a.strip() for a in (allow or "").split(",") if a.strip())
    options = ServeOptions(ae_title=ae_title, host=host, port=port, send_to=Destination.parse(send_to) if send_to else None,
                           fmt=fmt, workers=workers, allow=titles, settle=settle, send_tries=send_tries,
                           device=device or ("cuda" if torch.cuda.is_available() else "cpu"))
    run_node(list(model), store, options, log_level)


@app.command("make-atlas")
@user_errors
def make_atlas_cmd(
    dataset: Path = typer.Argument(..., help="Dataset in nnU-Net layout (imagesTr are used)."),
    out: Path = typer.Option(..., "--output", "-o", help="Atlas image to write."),
    max_cases: int = typer.Option(20, "--max-cases", min=1, help="Use at most this many training cases."),
) -> None:
    """Build a bilaterally symmetric atlas from self-aligned cases and their mirrors."""
    from sats.data.dataset import list_cases
    from sats.data.io import read_image, write_image
    from sats.geometry.preprocessing import make_atlas

    cases = list_cases(dataset, "Tr")[:max_cases]
    if not cases:
        raise SatsError(f"{dataset}: no training images")
    atlas = make_atlas([read_image(c.image) for c in cases])
    write_image(atlas, out)
    console.print(f"atlas from {len(cases)} case(s): size {atlas.shape[::-1]} (x, y, z), spacing {atlas.spacing[::-1]} mm -> {out}")


@app.command()
@user_errors
def demo(
    out: Path = typer.Option(Path("demo"), "--out", help="Folder for everything the demo writes."),
    quick: bool = typer.Option(False, "--quick", help="A small, fast run (minutes; scores lower)."),
) -> None:
    """End to end on the embedded phantom: generate, train, predict, evaluate, draw."""
    from sats.demo import run_demo

    run_demo(out, quick=quick, console=console)


def main() -> None:  # pragma: no cover - console entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
