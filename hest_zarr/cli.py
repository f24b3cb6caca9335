"""The ``hest-zarr`` command line. Each command mirrors a Python function of the package."""

from __future__ import annotations

import contextlib
import contextvars
import json
import sys
import warnings
from collections.abc import Iterator
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import typer
import typer.core
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from hest_zarr.errors import HestZarrError, redact


class _RedactingConsole(Console):
    """A console that never prints URL credentials (:func:`hest_zarr.errors.redact` on every string)."""

    def print(self, *objects: Any, **kwargs: Any) -> None:
        super().print(*(redact(o) if isinstance(o, str) else o for o in objects), **kwargs)


console = _RedactingConsole()
errors = _RedactingConsole(stderr=True)

#: What the command line itself raises to exit or to report a usage error: never ours to reword.
_TYPER_SIGNALS = (typer.Exit, typer.Abort, typer.TyperException)
#: Whether the running command was given ``--debug`` (tracebacks wanted).
_DEBUG: contextvars.ContextVar[bool] = contextvars.ContextVar("hest_zarr_cli_debug", default=False)


def _one_line(message: str) -> str:
    """Return ``message`` redacted, its newlines folded and its brackets escaped (they are not rich markup)."""
    return escape(" ".join(redact(message).split()))


def _print_error(message: str) -> None:
    """Print one ``error:`` line."""
    errors.print(f"[bold red]error:[/] {_one_line(message)}", highlight=False, soft_wrap=True)


def _show_warning(
    message: Warning | str, category: type[Warning], filename: str, lineno: int, file: Any = None, line: Any = None
) -> None:
    """Print a warning as one redacted ``warning:`` line (``warnings.showwarning`` while a command runs)."""
    errors.print(f"[yellow]warning:[/] {_one_line(str(message))}", highlight=False, soft_wrap=True)


@contextlib.contextmanager
def _redacted_warnings(debug: bool) -> Iterator[None]:
    """Show every warning of the command through :func:`hest_zarr.errors.redact`, then restore the previous hook.

    One ``warning:`` line each; under ``--debug``, Python's usual form (with the file and line that warned).
    """
    previous = warnings.showwarning

    def show_in_full(message: Warning | str, category: type[Warning], filename: str, lineno: int, *rest: Any) -> None:
        previous(redact(str(message)), category, filename, lineno, *rest)

    warnings.showwarning = show_in_full if debug else _show_warning
    try:
        yield
    finally:
        warnings.showwarning = previous


class _OneLineErrors(typer.core.TyperGroup):
    """The command group: every error becomes one line and exit status 1, a traceback only with ``--debug``.

    Our errors (:class:`~hest_zarr.errors.HestZarrError`) print their message; anything else prints its type and
    message and asks for a report, since it is a bug or an input we do not recognise yet.
    """

    def invoke(self, ctx: Any) -> Any:
        debug = bool(ctx.params.get("debug"))
        token = _DEBUG.set(debug)
        with _redacted_warnings(debug):
            try:
                return super().invoke(ctx)
            except _TYPER_SIGNALS:
                raise
            except HestZarrError as err:
                if debug:
                    raise
                _print_error(str(err))
            except Exception as err:
                if debug:
                    raise
                _print_error(f"{type(err).__name__}: {err} (run with --debug for the traceback; please report it)")
            finally:
                _DEBUG.reset(token)
        raise typer.Exit(1)


app = typer.Typer(
    name="hest-zarr",
    help="HEST-1k spatial transcriptomics + H&E samples as cloud-native SpatialData stores.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    cls=_OneLineErrors,
)

#: Ecosystem warnings that say nothing actionable to a user of the command line.
_QUIET_WARNINGS = (
    "zarr v3 autosharding will be the default",
    "Consolidated metadata is currently not part in the Zarr format 3 specification",
    "Object at .* is not recognized as a component of a Zarr hierarchy",
    "Numcodecs codecs are not in the Zarr version 3 specification",
    "Variable names are not unique",
)


@app.callback()
def _main(
    debug: Annotated[bool, typer.Option("--debug", help="Show the traceback of an error instead of one line.")] = False,
) -> None:
    for message in _QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message=f".*{message}")


StorageOptionsOption = Annotated[
    str | None,
    typer.Option(
        "--storage-options",
        help='fsspec options as JSON, e.g. \'{"client_kwargs": {"endpoint_url": "http://127.0.0.1:9000"}}\'.',
    ),
]


class Technology(StrEnum):
    """Technologies ``convert`` understands."""

    auto = "auto"
    visium = "visium"
    visium_hd = "visium-hd"
    xenium = "xenium"
    st = "st"
    legacy = "legacy"
    hest = "hest"


class Codec(StrEnum):
    """Image codecs."""

    zstd = "zstd"
    jpeg = "jpeg"


def _storage_options(text: str | None) -> dict[str, Any] | None:
    if text is None:
        return None
    try:
        options = json.loads(text)
    except json.JSONDecodeError as err:
        raise HestZarrError(f"--storage-options is not valid JSON ({err})") from err
    if not isinstance(options, dict):
        raise HestZarrError("--storage-options must be a JSON object")
    return options


@contextlib.contextmanager
def _clear_errors() -> Iterator[None]:
    """Print our errors as one line (no traceback; with ``--debug``, the traceback) and exit with status 1."""
    try:
        yield
    except HestZarrError as err:
        if _DEBUG.get():
            raise
        _print_error(str(err))
        raise typer.Exit(1) from None


def _check_output_folder(path: Path | None) -> None:
    """Refuse a local output file whose folder does not exist, before any work is done."""
    if path is not None and not path.parent.is_dir():
        raise HestZarrError(f"{path}: the folder {path.parent} does not exist")


@contextlib.contextmanager
def _progress(enabled: bool) -> Iterator[None]:
    if enabled and sys.stderr.isatty():
        from dask.diagnostics import ProgressBar

        with ProgressBar(out=sys.stderr):
            yield
    else:
        yield


@app.command()
def info(
    url: Annotated[str, typer.Argument(help="Store path or URL (s3://, gs://, https://...).")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
    storage_options: StorageOptionsOption = None,
) -> None:
    """Summarise a store: schema version, metadata and its elements."""
    from hest_zarr.store import info as store_info

    with _clear_errors():
        summary = store_info(url, _storage_options(storage_options))
    if as_json:
        print(json.dumps(summary, indent=2))
        return
    _print_summary(summary)


def _print_summary(summary: dict[str, Any]) -> None:
    meta = summary["metadata"]
    console.print(
        f"[bold]{summary['url']}[/]  sample [bold]{meta.get('id')}[/] ({meta.get('st_technology')}, "
        f"{meta.get('species', 'species unknown')}), schema {summary['schema_version']}, "
        f"{summary['pixel_size_um'] or float('nan'):.4f} um/px",
        highlight=False,
    )
    table = Table("element", "kind", "size", "coordinate systems")
    for name, element in summary["elements"].items():
        if element["kind"] == "tables":
            size = f"{element['n_obs']} obs x {element['n_vars']} vars (annotates {element['region']})"
        elif "shape" in element:
            size = " -> ".join("x".join(map(str, level)) for level in element["levels"])
        else:
            size = f"{element['n_rows']} rows"
        table.add_row(name, element["kind"], size, ", ".join(element.get("coordinate_systems", [])))
    console.print(table)


@app.command()
def validate(
    url: Annotated[str, typer.Argument(help="Store path or URL.")],
    quick: Annotated[
        bool,
        typer.Option(
            "--quick", help="Check the objects against the store's manifest by listing only (no reading, no decoding)."
        ),
    ] = False,
    storage_options: StorageOptionsOption = None,
) -> None:
    """Check a store against the schema; exit 0 when valid, 1 with one line per problem otherwise."""
    from hest_zarr.store import validate as store_validate

    with _clear_errors():
        problems = store_validate(url, _storage_options(storage_options), check_data=not quick)
    if problems:
        for problem in problems:
            errors.print(f"[bold red]invalid:[/] {_one_line(f'{url}: {problem}')}", highlight=False, soft_wrap=True)
        raise typer.Exit(1)
    console.print(f"{url}: valid")


@app.command()
def repair(
    url: Annotated[str, typer.Argument(help="Store path or URL whose write was interrupted.")],
    storage_options: StorageOptionsOption = None,
) -> None:
    """Finish a write that was interrupted while it moved a new store (or new elements) into place."""
    from hest_zarr.store import repair as store_repair

    with _clear_errors():
        finished = store_repair(url, _storage_options(storage_options))
    console.print(f"{url}: " + ("finished the interrupted write" if finished else "no interrupted write to finish"))


@app.command()
def convert(
    source: Annotated[
        Path,
        typer.Argument(
            metavar="INPUT", help="Space Ranger outs/, Visium HD or Xenium folder, HEST-1k root, or ST table."
        ),
    ],
    output: Annotated[str, typer.Argument(help="Store path or URL to write.")],
    technology: Annotated[Technology, typer.Option(help="Source technology (auto: from the files).")] = Technology.auto,
    image: Annotated[Path | None, typer.Option(help="Full-resolution H&E image.")] = None,
    alignment: Annotated[
        Path | None, typer.Option(help="ST v1 spot-detector table, or Xenium H&E alignment CSV.")
    ] = None,
    coordinates: Annotated[Path | None, typer.Option(help="Coordinate table of a legacy expression table.")] = None,
    sample_id: Annotated[str | None, typer.Option(help="Sample id (default: folder name).")] = None,
    metadata: Annotated[Path | None, typer.Option(help="HEST-1k metadata CSV to fill metadata from.")] = None,
    codec: Annotated[Codec, typer.Option(help="Image codec.")] = Codec.zstd,
    jpeg_quality: Annotated[int, typer.Option(min=1, max=100, help="JPEG quality.")] = 90,
    chunk_size: Annotated[int, typer.Option(min=64, max=4096, help="Image chunk side (px).")] = 512,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing store.")] = False,
    storage_options: StorageOptionsOption = None,
    progress: Annotated[bool, typer.Option(help="Show progress bars.")] = True,
) -> None:
    """Convert a sample into a store."""
    from hest_zarr.workflows.convert import convert as convert_sample

    with _clear_errors(), _progress(progress):
        url = convert_sample(
            source,
            output,
            technology=technology.value,
            image=image,
            alignment=alignment,
            coordinates=coordinates,
            sample_id=sample_id,
            metadata_csv=metadata,
            image_codec=codec.value,
            jpeg_quality=jpeg_quality,
            chunk_size=chunk_size,
            overwrite=overwrite,
            storage_options=_storage_options(storage_options),
        )
    console.print(f"wrote {url}")


@app.command()
def patch(
    url: Annotated[str, typer.Argument(help="Sample store path or URL.")],
    output: Annotated[str, typer.Argument(help="Patch store (zarr) to write, path or URL.")],
    size: Annotated[int, typer.Option(min=1, help="Patch side in pixels.")] = 224,
    pixel_size: Annotated[float, typer.Option(min=0.0, help="Target micrometres per pixel.")] = 0.5,
    element: Annotated[str, typer.Option(help="Shapes or points element to centre patches on, or 'grid'.")] = "spots",
    in_tissue_only: Annotated[bool, typer.Option(help="Only spots flagged in_tissue.")] = False,
    codec: Annotated[Codec, typer.Option(help="Codec of the patch images.")] = Codec.zstd,
    h5: Annotated[Path | None, typer.Option(help="Also export HEST's patches .h5 layout here.")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing patch store.")] = False,
    storage_options: StorageOptionsOption = None,
    out_storage_options: Annotated[
        str | None,
        typer.Option(
            "--out-storage-options",
            help="fsspec options (JSON) of the patch store (default: --storage-options when on the same protocol).",
        ),
    ] = None,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
) -> None:
    """Cut a patch around every spot (or grid tile) and write them to a patch store."""
    from hest_zarr.converters.hest_patches import export_hest_h5
    from hest_zarr.store import open_patches, output_storage_options
    from hest_zarr.workflows.patch import write_patches

    with _clear_errors():
        _check_output_folder(h5)
        options = _storage_options(storage_options)
        out_options = output_storage_options(output, url, options, _storage_options(out_storage_options))
        written = write_patches(
            url,
            output,
            element=element,
            size_px=size,
            pixel_size_um=pixel_size,
            in_tissue_only=in_tissue_only,
            codec=codec.value,
            overwrite=overwrite,
            storage_options=options,
            out_storage_options=out_options,
            progress=progress,
        )
        patches = open_patches(written, out_options)
        if h5 is not None:
            export_hest_h5(patches, h5)
    attributes = patches.attributes
    console.print(
        f"wrote {len(patches)} patches of {size} px at {pixel_size} um/px to {written} "
        f"(level {attributes['level']}, resampling {attributes['resampling']})"
    )
    if h5 is not None:
        console.print(f"wrote {h5}")


class TissueMethod(StrEnum):
    """Tissue segmentation methods."""

    threshold = "threshold"
    deeplab = "deeplab"


@app.command()
def tissue(
    url: Annotated[str, typer.Argument(help="Store path or URL holding an 'he' image.")],
    method: Annotated[TissueMethod, typer.Option(help="Segmentation method.")] = TissueMethod.threshold,
    weights: Annotated[Path | None, typer.Option(help="DeepLabV3-ResNet50 state dict (method deeplab).")] = None,
    level: Annotated[int | None, typer.Option(min=0, help="Pyramid level of 'he' (default: coarsest).")] = None,
    replace: Annotated[bool, typer.Option(help="Replace an existing 'tissue' element.")] = False,
    storage_options: StorageOptionsOption = None,
) -> None:
    """Segment the tissue: write 'tissue' polygons and the spots' in_tissue flags."""
    from hest_zarr.workflows.tissue import tissue as segment

    with _clear_errors():
        result = segment(
            url,
            method=method.value,
            weights=weights,
            level=level,
            replace=replace,
            storage_options=_storage_options(storage_options),
        )
    console.print(f"{url}: {len(result.polygons)} tissue polygon(s) from 'he' level {result.level}")
    for table, count in result.in_tissue.items():
        agreement = result.agreement_f1.get(table)
        versus = f", F1 {agreement:.3f} against the previous in_tissue" if agreement is not None else ""
        console.print(f"  {table}: {count} spots in tissue{versus}", highlight=False)


@app.command("pixel-size")
def pixel_size(
    url: Annotated[str, typer.Argument(help="Store path or URL with spots on a lattice.")],
    spots: Annotated[str | None, typer.Option(help="Spots element (default: spots, or the coarsest bins).")] = None,
    tolerance: Annotated[float, typer.Option(min=0.0, help="Relative disagreement that is flagged.")] = 0.05,
    write: Annotated[bool, typer.Option(help="Record the estimate in the store.")] = True,
    storage_options: StorageOptionsOption = None,
) -> None:
    """Estimate the pixel size from the spot lattice and compare it with the embedded and the store's values."""
    from hest_zarr.elements.lattice import PixelSizeDisagreementWarning
    from hest_zarr.workflows.pixel_size import estimate_pixel_size

    with _clear_errors(), warnings.catch_warnings():
        warnings.simplefilter("ignore", PixelSizeDisagreementWarning)  # the disagreement is printed below
        report = estimate_pixel_size(
            url, spots=spots, tolerance=tolerance, write=write, storage_options=_storage_options(storage_options)
        )
    estimate = report.estimate
    console.print(
        f"{url}: {estimate.pixel_size_um:.5f} +/- {estimate.uncertainty_um:.1g} um/px from {estimate.n_spots} "
        f"'{report.spots}' on the {estimate.lattice} lattice ({estimate.n_outliers} outliers)",
        highlight=False,
    )
    for name, value in report.references.items():
        console.print(f"  {name}: {value:.5f} um/px ({report.differences[name]:+.2%})", highlight=False)
    verdict = f"DISAGREEMENT over {tolerance:.0%}" if report.flagged else f"agree within {tolerance:.0%}"
    console.print(f"  {verdict}", highlight=False)


class VisiumSlide(StrEnum):
    """Visium capture-area sizes."""

    auto = "auto"
    small = "6.5mm"
    large = "11mm"


class FiducialDetector(StrEnum):
    """Fiducial corner detectors."""

    auto = "auto"
    yolo = "yolo"
    classical = "classical"


def _alignment_summary(result: Any) -> str:
    fit = result.fit
    return (
        f"{result.slide} slide, {result.detector} detector, corners {', '.join(fit.corners_used)}, "
        f"{fit.n_frame_dots} frame dots, residual {fit.residual_um:.1f} um ({fit.residual_px:.2f} px), "
        f"{int(result.spots['in_tissue'].sum())} of {len(result.spots)} spots on tissue"
    )


@app.command()
def align(
    url: Annotated[str, typer.Argument(help="Visium store path or URL (he image, spots, spot_expression).")],
    slide: Annotated[
        VisiumSlide, typer.Option(help="Capture-area size (auto: the frame that fits).")
    ] = VisiumSlide.auto,
    detector: Annotated[
        FiducialDetector, typer.Option(help="Corner detector (auto: every available one, best residual wins).")
    ] = FiducialDetector.auto,
    level: Annotated[
        int | None, typer.Option(min=0, help="Pyramid level of 'he' (default: <= 4096 px a side).")
    ] = None,
    storage_options: StorageOptionsOption = None,
) -> None:
    """Align the H&E to the Visium slide layout from its fiducial frame; rewrite the spot positions and in_tissue."""
    from hest_zarr.workflows.align import align as align_store

    with _clear_errors():
        result = align_store(
            url,
            slide=slide.value,
            detector=detector.value,
            level=level,
            storage_options=_storage_options(storage_options),
        )
    console.print(f"{url}: aligned, {_alignment_summary(result)}", highlight=False)


@app.command("align-image")
def align_image(
    image: Annotated[Path, typer.Argument(help="H&E or CytAssist image (PNG, JPEG, TIFF) with the fiducial frame.")],
    out: Annotated[
        Path, typer.Option("--out", help="CSV to write: array_row, array_col, pxl_row, pxl_col, in_tissue.")
    ],
    slide: Annotated[
        VisiumSlide, typer.Option(help="Capture-area size (auto: the frame that fits).")
    ] = VisiumSlide.auto,
    detector: Annotated[
        FiducialDetector, typer.Option(help="Corner detector (auto: every available one, best residual wins).")
    ] = FiducialDetector.auto,
) -> None:
    """Find the fiducial frame of a Visium image and write every spot's pixel position (Space Ranger row/col)."""
    from hest_zarr.ops.align import SPOT_COLUMNS
    from hest_zarr.workflows.align import align_image_file

    with _clear_errors():
        _check_output_folder(out)
        result = align_image_file(image, slide=slide.value, detector=detector.value)
    result.spots[[*SPOT_COLUMNS, "in_tissue"]].to_csv(out, index=False)
    console.print(f"wrote {len(result.spots)} spots to {out}: {_alignment_summary(result)}", highlight=False)


@app.command()
def register(
    url: Annotated[str, typer.Argument(help="Xenium store path or URL holding 'he' and 'dapi'.")],
    force: Annotated[bool, typer.Option(help="Register even when an alignment file placed the H&E.")] = False,
    storage_options: StorageOptionsOption = None,
) -> None:
    """Register the H&E to the DAPI image and re-place the Xenium elements (kept: a file's alignment)."""
    from hest_zarr.workflows.register import register as register_store

    with _clear_errors():
        result = register_store(url, force=force, storage_options=_storage_options(storage_options))
    console.print(
        f"{url}: {result.method}; residual {result.residual_px:.3f} DAPI px over {result.n_inliers} inliers",
        highlight=False,
    )


@app.command()
def pool(
    url: Annotated[str, typer.Argument(help="Xenium store (transcripts) or Visium HD store (bins), path or URL.")],
    size_um: Annotated[float, typer.Option(help="Xenium: side of the square pseudo-spots, um.")] = 55.0,
    origin_um: Annotated[tuple[float, float], typer.Option(help="Xenium: corner X Y of square x0_y0, um.")] = (0, 0),
    min_qv: Annotated[float, typer.Option(help="Xenium: count molecules of qv >= this (0: every one).")] = 20.0,
    controls: Annotated[bool, typer.Option(help="Xenium: count control probes/codewords (flagged in var).")] = True,
    suffix: Annotated[str | None, typer.Option(help="Xenium: write spots_SUFFIX, spot_expression_SUFFIX.")] = None,
    from_bin_um: Annotated[int, typer.Option(min=1, help="Visium HD: size of the bins to pool, um.")] = 2,
    to_bin_um: Annotated[int | None, typer.Option(min=1, help="Visium HD: pool into bins of this size, um.")] = None,
    replace: Annotated[bool, typer.Option(help="Replace existing elements of the same names.")] = False,
    storage_options: StorageOptionsOption = None,
) -> None:
    """Pool Xenium molecules into square pseudo-spots, or (with --to-bin-um) Visium HD bins into larger bins."""
    from hest_zarr.workflows.pool import pool_bins, pool_transcripts

    with _clear_errors():
        options = _storage_options(storage_options)
        if to_bin_um is not None:
            summary = pool_bins(url, from_bin_um, to_bin_um, replace=replace, storage_options=options)
        else:
            summary = pool_transcripts(
                url,
                size_um,
                origin_um=origin_um,
                min_qv=min_qv,
                include_controls=controls,
                suffix=suffix,
                replace=replace,
                storage_options=options,
            )
    console.print(
        f"{url}: wrote '{summary.spots}' ({summary.n_spots} squares) and '{summary.table}' ({summary.n_genes} genes, "
        f"{summary.total_counts} molecules)",
        highlight=False,
    )


@app.command()
def demo(
    output: Annotated[Path, typer.Argument(help="Where to write the demo store.")] = Path("demo_output/mob1.zarr"),
) -> None:
    """Convert the bundled real ST v1 section (MOB1), patch it and print a summary."""
    from hest_zarr.workflows.demo import demo_sample_path, run_demo

    console.print(f"converting bundled sample {demo_sample_path()} (ST v1 MOB1, STUtility, MIT)")
    with _clear_errors():
        summary = run_demo(output)
    _print_summary(summary["store"])
    console.print("store validates; opens with spatialdata.read_zarr and hest_zarr.open")
    patches = summary["patches"]
    console.print(
        f"wrote {patches['n']} patches {patches['shape'][1]} x {patches['shape'][2]} px "
        f"({patches['field_um']:.0f} um at {patches['pixel_size_um']:.3f} um/px) to {patches['url']}"
    )


@app.command()
def bench(
    config: Annotated[Path, typer.Argument(help="Benchmark configuration (YAML or JSON): tasks, encoders, output.")],
    output: Annotated[Path | None, typer.Option(help="Results folder (replaces the configuration's).")] = None,
    device: Annotated[str | None, typer.Option(help="auto, cpu, cuda, cuda:1 (replaces the configuration's).")] = None,
    progress: Annotated[bool, typer.Option(help="Show progress bars.")] = True,
) -> None:
    """Run the HEST-Benchmark: embed patches (cached in the stores), regress expression, report Pearson r."""
    import logging

    from hest_zarr.bench import load_config, run_benchmark, summary_markdown

    logging.getLogger("hest_zarr.bench").setLevel(logging.INFO)
    logging.basicConfig(format="%(message)s")
    with _clear_errors():
        settings = load_config(config, output=output, device=device)
        settings.progress = progress
        results = run_benchmark(settings)
    console.print(summary_markdown(results), highlight=False, markup=False)
    if settings.output is not None:
        console.print(f"results in {settings.output} ({results.timings['total_s']:.0f} s)")


@app.command("export-schemas")
def export_schemas(
    directory: Annotated[Path, typer.Argument(help="Folder to write the JSON Schema files to.")] = Path("schemas"),
) -> None:
    """Write the JSON Schema files of the metadata and store record models."""
    from hest_zarr.schemas import export_json_schemas

    for path in export_json_schemas(directory):
        console.print(str(path))


if __name__ == "__main__":
    app()
