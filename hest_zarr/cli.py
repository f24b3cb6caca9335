"""The ``hest-zarr`` command line. Each command mirrors a Python function of the package."""

from __future__ import annotations

import contextlib
import json
import sys
import warnings
from collections.abc import Iterator
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from hest_zarr.errors import HestZarrError

app = typer.Typer(
    name="hest-zarr",
    help="HEST-1k spatial transcriptomics + H&E samples as cloud-native SpatialData stores.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()
errors = Console(stderr=True)

#: Ecosystem warnings that say nothing actionable to a user of the command line.
_QUIET_WARNINGS = (
    "zarr v3 autosharding will be the default",
    "Consolidated metadata is currently not part in the Zarr format 3 specification",
    "Object at .* is not recognized as a component of a Zarr hierarchy",
    "Numcodecs codecs are not in the Zarr version 3 specification",
    "Variable names are not unique",
)


@app.callback()
def _main() -> None:
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
    """Print our errors as one line (no traceback) and exit with status 1."""
    try:
        yield
    except HestZarrError as err:
        errors.print(f"[bold red]error:[/] {err}", highlight=False, soft_wrap=True)
        raise typer.Exit(1) from None


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
    quick: Annotated[bool, typer.Option("--quick", help="Skip decoding every image chunk.")] = False,
    storage_options: StorageOptionsOption = None,
) -> None:
    """Check a store against the schema; exit 0 when valid, 1 with one line per problem otherwise."""
    from hest_zarr.store import validate as store_validate

    with _clear_errors():
        problems = store_validate(url, _storage_options(storage_options), check_data=not quick)
    if problems:
        for problem in problems:
            errors.print(f"[bold red]invalid:[/] {url}: {problem}", highlight=False, soft_wrap=True)
        raise typer.Exit(1)
    console.print(f"{url}: valid")


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
    from hest_zarr.converters import read_sample
    from hest_zarr.errors import InputError
    from hest_zarr.schemas import metadata_by_id, read_hest_metadata_csv
    from hest_zarr.store import write

    with _clear_errors():
        known = None
        if metadata is not None:
            sid = sample_id or source.name
            known = metadata_by_id(read_hest_metadata_csv(metadata)[0]).get(sid)
            if known is None:
                raise InputError(f"{metadata}: no row with id {sid!r}")
        sdata = read_sample(
            source,
            technology=technology.value,
            image=image,
            alignment=alignment,
            coordinates=coordinates,
            sample_id=sample_id,
            metadata=known,
        )
        with _progress(progress):
            url = write(
                sdata,
                output,
                overwrite=overwrite,
                image_codec=codec.value,
                jpeg_quality=jpeg_quality,
                chunk_size=chunk_size,
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
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
) -> None:
    """Cut a patch around every spot (or grid tile) and write them to a patch store."""
    from hest_zarr.ops.patch import export_hest_h5, open_patches, write_patches

    with _clear_errors():
        written = write_patches(
            url,
            output,
            element=element,
            size_px=size,
            pixel_size_um=pixel_size,
            in_tissue_only=in_tissue_only,
            codec=codec.value,
            overwrite=overwrite,
            storage_options=_storage_options(storage_options),
            progress=progress,
        )
        patches = open_patches(written)
        if h5 is not None:
            export_hest_h5(patches, h5)
    attributes = patches.attributes
    console.print(
        f"wrote {len(patches)} patches of {size} px at {pixel_size} um/px to {written} "
        f"(level {attributes['level']}, resampling {attributes['resampling']})"
    )
    if h5 is not None:
        console.print(f"wrote {h5}")


@app.command()
def demo(
    output: Annotated[Path, typer.Argument(help="Where to write the demo store.")] = Path("demo_output/mob1.zarr"),
) -> None:
    """Convert the bundled real ST v1 section (MOB1), patch it and print a summary."""
    from hest_zarr.demo import demo_sample_path, run_demo

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
