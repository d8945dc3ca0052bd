"""python -m d2dprompt.pipeline.download [NAME] [--params params.yaml] [--out stages/download]

Prepare dataset NAME (every dataset of params.yaml when left out) as `<out>/<NAME>/` in MVTec AD
layout with a `manifest.csv`. DVC runs it once per dataset: stage `download@<archive>` for each of
`download.archives` (`mvtec`: the MVTec AD archive; `visa`: the VisA archive, converted with its
`split_csv/1cls.csv`; `btad`, `mpdd`, `mvtec_ad2`: converted by converters.py), stage `folder@<name>` for
each entry of `download.folders` (name: an MVTec-layout folder, such as the bundled sample or your own
images). Archives are downloaded once into `download.archive_dir` (resumable, sha256-verified); put an
archive there by hand to skip the download. MPDD has no direct link: `download.mpdd_path` names the zip,
tar or extracted folder you fetched. A folder is the `folder@<name>` stage's dependency, so a changed, added or removed image or
mask in it makes `dvc repro` rerun the pipeline from there.

What a failure leaves: each dataset is built in a scratch folder `<out>/.tmp-<name>-*` and renamed
into place only when complete; the next run removes scratch folders a killed run left behind.
- Run directly (`python -m d2dprompt.pipeline.download`), a failed or killed run leaves the previous
  `<out>/<name>/` as it was.
- Under DVC (`dvc repro`, `dvc exp run`), DVC removes the stage's output `stages/download/<name>` before
  the stage runs, so after a failure there is no previous output in the workspace (`dvc checkout`
  restores the version recorded in dvc.lock from the DVC cache). What survives is the archive cache
  in `download.archive_dir`: verified archives, and a partial `<archive>.part` that the next run
  resumes, so a rerun does not download again.

Symbolic links in a folder dataset may point to files or folders inside that dataset
folder (they are followed; the copy holds regular files). A link whose target lies outside it stops
the stage with one line naming the link and its target: a dataset folder must hold its own data,
and following such a link would copy any file the user can read into the outputs. (Archive entries
are held to the same rule by `safe_extract`.)
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import http.client
import os
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from pathlib import Path, PurePosixPath
from typing import Optional

import numpy as np
import typer
from PIL import Image
from tqdm import tqdm

from d2dprompt.core.runtime.config import MANUAL, DownloadParams, ParamsError
from d2dprompt.params import load_params
from d2dprompt.core.data.converters import CONVERTERS
from d2dprompt.core.runtime.cli import summary
from d2dprompt.core.data.images import ImageError, load_mask, load_rgb
from d2dprompt.core.runtime.outputs import replace_dir
from d2dprompt.core.data.manifest import (
    GOOD,
    MANIFEST_NAME,
    LayoutError,
    ManifestError,
    ManifestRow,
    manifest_summary,
    scan_mvtec_layout,
    write_manifest,
)

VISA_DEFECT = "bad"  # VisA labels anomalies without a defect type; one folder name for all
CHUNK_BYTES = 1 << 20  # 1 MiB reads: few syscalls, smooth progress bar
TIMEOUT_S = 60  # a stalled connection fails (and can be resumed) instead of hanging the stage
TMP_PREFIX = ".tmp-"  # every scratch folder under <out> starts with this


class DownloadError(RuntimeError):
    """A download, checksum or archive problem; the message starts with the URL or file at fault."""


# ---------------------------------------------------------------- downloading


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    size = path.stat().st_size
    quick = size < (256 << 20)  # hashing takes under a second: no bar
    bar = tqdm(total=size, unit="B", unit_scale=True, desc=f"sha256 {path.name}", disable=quick)
    with path.open("rb") as fh, bar:
        while chunk := fh.read(CHUNK_BYTES):
            digest.update(chunk)
            bar.update(len(chunk))
    return digest.hexdigest()


def _stream_to(url: str, part: Path) -> None:
    """Append the rest of `url` to `part` (HTTP Range from its current size), or write it whole."""
    start = part.stat().st_size if part.exists() else 0
    headers = {"User-Agent": "d2dprompt"}
    if start:
        headers["Range"] = f"bytes={start}-"
    try:
        response = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=TIMEOUT_S)
    except urllib.error.HTTPError as err:
        if err.code == 416 and start:  # nothing left to send: the .part already holds the whole file
            return
        raise DownloadError(f"{url}: HTTP {err.code} {err.reason}") from None
    except (urllib.error.URLError, OSError) as err:
        raise DownloadError(f"{url}: cannot connect ({getattr(err, 'reason', err)})") from None
    except ValueError as err:  # not a URL at all
        raise DownloadError(f"{url!r}: {err}") from None
    with response:
        status = getattr(response, "status", None) or 200  # file:// answers without a status
        content_range = response.headers.get("Content-Range", "")
        resumed = start > 0 and status == 206 and content_range.startswith(f"bytes {start}-")
        if not resumed:
            start = 0  # the server ignored the Range header: start over
        length = response.headers.get("Content-Length")
        total = start + int(length) if length else None
        received = start
        try:
            with part.open("ab" if resumed else "wb") as fh, tqdm(
                total=total, initial=start, unit="B", unit_scale=True, unit_divisor=1024, desc=part.name
            ) as bar:
                while chunk := response.read(CHUNK_BYTES):
                    fh.write(chunk)
                    received += len(chunk)
                    bar.update(len(chunk))
        except (OSError, http.client.HTTPException) as err:  # timeouts, resets, IncompleteRead
            raise DownloadError(f"{url}: download interrupted at {received} bytes ({err}); rerun to resume") from None
    if total is not None and received != total:
        raise DownloadError(f"{url}: download stopped at {received} of {total} bytes; rerun to resume")


def fetch(url: str, dest: Path, sha256: str) -> Path:
    """Download `url` to `dest` once, resuming from `dest.part`; the file is used only if its sha256 matches."""
    dest = Path(dest)
    expected = sha256.strip().lower()
    if not dest.is_file():
        dest.parent.mkdir(parents=True, exist_ok=True)
        part = dest.with_name(dest.name + ".part")
        _stream_to(url, part)
        os.replace(part, dest)
    actual = sha256_of(dest)
    if actual != expected:
        dest.unlink()
        raise DownloadError(f"{dest}: sha256 mismatch, expected {expected}, got {actual} (file removed)")
    return dest


def archive_path(archive_dir: str | Path, url: str, source: str) -> Path:
    name = PurePosixPath(urllib.parse.urlparse(url).path).name or f"{source}.archive"
    return Path(archive_dir) / name


# ---------------------------------------------------------------- extraction


def _entry_path(name: str) -> tuple[PurePosixPath, str | None]:
    """An archive entry's name as a path inside the archive, and why it would land outside the target (or None)."""
    path = PurePosixPath(name.replace("\\", "/"))
    if path.is_absolute() or (len(name) > 1 and name[1] == ":"):
        return path, "absolute path"
    if ".." in path.parts:
        return path, "'..' in path"
    return path, None


def _unsafe_reason(member: tarfile.TarInfo) -> str | None:
    path, reason = _entry_path(member.name)
    if reason:
        return reason
    if member.issym() or member.islnk():
        target = PurePosixPath(member.linkname.replace("\\", "/"))
        if target.is_absolute():
            return f"link to absolute path {member.linkname}"
        # symlinks resolve from the entry's folder, hardlinks from the archive root
        resolved = os.path.normpath(str(path.parent / target) if member.issym() else str(target))
        if resolved == ".." or resolved.startswith("../"):
            return f"link to {member.linkname} points outside the archive"
    elif not (member.isfile() or member.isdir()):
        return "device, fifo or other special entry"
    return None


def _unsafe_zip_reason(info: zipfile.ZipInfo) -> str | None:
    _, reason = _entry_path(info.filename)
    if reason is None and (info.external_attr >> 16) & 0o170000 == 0o120000:  # a Unix symlink stored in the zip
        return "symbolic link"
    return reason


def _safe_extract_zip(archive: Path, dest: Path) -> None:
    try:
        with zipfile.ZipFile(archive) as zf:
            for info in tqdm(zf.infolist(), desc=f"extract {archive.name}", unit=" files"):
                reason = _unsafe_zip_reason(info)
                if reason:
                    raise DownloadError(f"{archive}: unsafe entry '{info.filename}' ({reason})")
                target = dest / _entry_path(info.filename)[0]
                if info.is_dir():
                    target.mkdir(parents=True, exist_ok=True)
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(info) as src, target.open("wb") as dst:
                    shutil.copyfileobj(src, dst, CHUNK_BYTES)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, OSError, ValueError) as err:  # CRC errors are BadZipFile
        raise DownloadError(f"{archive}: cannot extract archive ({err})") from None


def safe_extract(archive: Path, dest: Path) -> None:
    """Extract a zip or a tar (any compression) into `dest`, refusing entries that would land outside it."""
    dest.mkdir(parents=True, exist_ok=True)
    if zipfile.is_zipfile(archive):
        _safe_extract_zip(archive, dest)
        return
    try:
        with tarfile.open(archive, "r:*") as tar:
            for member in tqdm(tar, desc=f"extract {archive.name}", unit=" files"):
                reason = _unsafe_reason(member)
                if reason:
                    raise DownloadError(f"{archive}: unsafe entry '{member.name}' ({reason})")
                try:  # the 'data' filter also resolves links against what is already on disk
                    tar.extract(member, dest, filter="data")
                except tarfile.FilterError as err:
                    raise DownloadError(f"{archive}: unsafe entry '{member.name}' ({err})") from None
    except (tarfile.TarError, EOFError, OSError, ValueError) as err:  # lzma/zlib errors are OSError/EOFError
        if isinstance(err, DownloadError):
            raise
        raise DownloadError(f"{archive}: cannot extract archive ({err})") from None


def _is_mvtec_root(folder: Path) -> bool:
    return any((child / "train").is_dir() for child in folder.iterdir() if child.is_dir())


def _is_visa_root(folder: Path) -> bool:
    return (folder / "split_csv" / "1cls.csv").is_file()


def _single_subdir_or_self(folder: Path, is_root) -> Path:
    """The folder itself, or its only subfolder when the archive wraps everything in one."""
    if is_root(folder):
        return folder
    subdirs = [d for d in folder.iterdir() if d.is_dir()]
    if len(subdirs) == 1 and is_root(subdirs[0]):
        return subdirs[0]
    return folder


# ---------------------------------------------------------------- VisA


def _safe_relative(value: str, where: str) -> PurePosixPath:
    path = PurePosixPath(value.strip().replace("\\", "/"))
    if not value.strip() or path.is_absolute() or ".." in path.parts:
        raise DownloadError(f"{where}: bad path {value!r}")
    return path


def convert_visa(visa_root: Path, dest: Path, categories: list[str], shown_as: str) -> None:
    """Turn an extracted VisA tree into MVTec layout under `dest` (moving images, binarising masks to 0/255).

    Errors name files as `<shown_as>/<path in the archive>`.
    """
    split_csv = visa_root / "split_csv" / "1cls.csv"
    with _shown(visa_root, shown_as), split_csv.open(newline="", encoding="utf-8-sig") as fh:  # -sig: a spreadsheet's byte-order mark is not a column name
        reader = csv.DictReader(fh)
        needed = {"object", "split", "label", "image", "mask"}
        if not needed <= set(reader.fieldnames or []):
            raise DownloadError(f"{split_csv}: columns must include {', '.join(sorted(needed))}")
        records = [(reader.line_num, row) for row in reader]
        seen = set()
        for line, row in tqdm(records, desc="convert visa", unit=" images"):
            where = f"{split_csv}:{line}"
            category, split, label = row["object"].strip(), row["split"].strip(), row["label"].strip()
            seen.add(category)
            if categories and category not in categories:
                continue
            if split not in ("train", "test") or label not in ("normal", "anomaly"):
                raise DownloadError(f"{where}: split must be train/test and label normal/anomaly, got {split}/{label}")
            if split == "train" and label == "anomaly":
                raise DownloadError(f"{where}: anomalous image in the train split is not MVTec layout")
            image = visa_root / _safe_relative(row["image"], where)
            if not image.is_file():
                raise DownloadError(f"{where}: image {row['image']} not in the archive")
            defect = GOOD if label == "normal" else VISA_DEFECT
            target = dest / category / split / defect / image.name
            if target.exists():
                raise DownloadError(f"{where}: two images named {image.name} in {category}/{split}/{defect}")
            target.parent.mkdir(parents=True, exist_ok=True)
            if label == "anomaly":
                _write_binary_mask(image, visa_root / _safe_relative(row["mask"], where), dest / category, where)
            os.replace(image, target)
        unknown = sorted(set(categories) - seen)
        if unknown:
            raise LayoutError(f"{split_csv}: no category {', '.join(unknown)} (found: {', '.join(sorted(seen))})")
    _copy_notices(visa_root, dest)


def _write_binary_mask(image: Path, mask_file: Path, category_dir: Path, where: str) -> None:
    """VisA masks hold class ids; MVTec layout wants 0/255 at `ground_truth/bad/<stem>_mask.png`."""
    if not mask_file.is_file():
        raise DownloadError(f"{where}: mask {mask_file} not in the archive")
    try:
        with Image.open(image) as img:  # the header is enough for the size; the image is decoded later
            width, height = img.size
    except OSError as err:
        raise ImageError(f"{image}: cannot decode image ({err})") from None
    mask = load_mask(mask_file, (height, width), binary=False)  # VisA masks hold class ids
    target = category_dir / "ground_truth" / VISA_DEFECT / f"{image.stem}_mask.png"
    target.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(mask.astype(np.uint8) * 255).save(target)


@contextlib.contextmanager
def _shown(root: Path, shown_as: str):
    """Re-raise the project's errors with the scratch folder `root` replaced by what the user knows."""
    try:
        yield
    except (LayoutError, ImageError, DownloadError) as err:
        raise type(err)(str(err).replace(str(root), shown_as)) from None


# ---------------------------------------------------------------- building one dataset


def refuse_outside_links(root: Path, relative: str) -> None:
    """Raise when a component of `root/relative` is a symbolic link leading outside `root`."""
    inside = root.resolve()
    path = root
    for part in PurePosixPath(relative).parts:
        path = path / part
        if path.is_symlink():
            target = path.resolve()
            if not target.is_relative_to(inside):
                raise LayoutError(f"{path}: symbolic link to {target}, outside the dataset folder; copy the file in instead")


def _copy_notices(source: Path, dest: Path) -> None:
    """Licence and readme files at the dataset root travel with the images."""
    for item in sorted(source.iterdir()):
        if item.is_file() and item.name.lower().startswith(("license", "licence", "readme")):
            refuse_outside_links(source, item.name)
            dest.mkdir(parents=True, exist_ok=True)
            shutil.copy2(item, dest / item.name)


def _notices_along(source: Path, dest: Path) -> None:
    """The notices of `source` and of each folder below it while it holds one folder only (an archive's
    `BTech_Dataset_transformed/`, `mvtec_ad_2/`): where a publisher keeps them above its categories."""
    folder = source
    while True:
        _copy_notices(folder, dest)
        below = [p for p in folder.iterdir() if p.is_dir() and not p.is_symlink()]
        if len(below) != 1:
            return
        folder = below[0]


@contextlib.contextmanager
def _scratch_dir(out: Path, label: str):
    out.mkdir(parents=True, exist_ok=True)
    path = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{label}-", dir=out))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def build_dataset(
    name: str, source: Path, out: Path, categories: list[str], *, move: bool, shown_as: str
) -> list[ManifestRow]:
    """Validate `source` (MVTec layout), copy (or move) its images to `<out>/<name>/` with a manifest.

    Every image is decoded once and every mask checked against its image's size;
    errors name the file as `<shown_as>/<relative path>`.
    """
    with _shown(source, shown_as):
        rows = scan_mvtec_layout(source, name, categories or None)
    place = os.replace if move else shutil.copyfile
    with _scratch_dir(out, name) as scratch:
        build = scratch / name
        for row in tqdm(rows, desc=f"prepare {name}", unit=" images"):
            for rel in (row.image_path, row.mask_path):
                if rel:
                    (build / rel).parent.mkdir(parents=True, exist_ok=True)
            src_image = source / row.image_path
            with _shown(source, shown_as):
                for rel in (row.image_path, row.mask_path):
                    if rel:
                        refuse_outside_links(source, rel)
                shape = load_rgb(src_image).shape[:2]
                if row.mask_path:
                    load_mask(source / row.mask_path, shape)
            place(src_image, build / row.image_path)
            if row.mask_path:
                place(source / row.mask_path, build / row.mask_path)
        _copy_notices(source, build)
        write_manifest(rows, build / MANIFEST_NAME)
        replace_dir(build, out / name)
    return rows


def prepare_source(name: str, params: DownloadParams, out: Path) -> list[ManifestRow]:
    """Build `<out>/<name>/` from dataset `name` (a folder of download.folders or an archive); returns its manifest rows."""
    if name in params.folders:
        folder = params.folders[name]
        if not Path(folder).is_dir():
            raise LayoutError(f"{folder}: folder not found (download.folders.{name})")
        return build_dataset(name, Path(folder), out, params.categories, move=False, shown_as=str(folder))
    if name in MANUAL:
        given = Path(getattr(params, f"{name}_path"))
        if not given.exists():
            raise LayoutError(f"{given}: not found (download.{name}_path); {name} is a manual download: fetch it from "
                              f"{MANUAL[name]} and point download.{name}_path at the archive or its extracted folder")
        if given.is_dir():
            return convert_and_build(name, given, out, params.categories, move=False, shown_as=str(given))
        archive = given
    else:
        url, sha256 = getattr(params, f"{name}_url"), getattr(params, f"{name}_sha256")
        archive = fetch(url, archive_path(params.archive_dir, url, name), sha256)
    with _scratch_dir(out, f"{name}-extract") as extracted:
        safe_extract(archive, extracted)
        if name in CONVERTERS:
            return convert_and_build(name, extracted, out, params.categories, move=True, shown_as=str(archive))
        if name == "mvtec":
            root = _single_subdir_or_self(extracted, _is_mvtec_root)
            return build_dataset(name, root, out, params.categories, move=True, shown_as=str(archive))
        root = _single_subdir_or_self(extracted, _is_visa_root)
        if not _is_visa_root(root):
            raise LayoutError(f"{archive}: no split_csv/1cls.csv inside; not a VisA archive")
        converted = extracted / f"{TMP_PREFIX}converted"
        convert_visa(root, converted, params.categories, shown_as=str(archive))
        return build_dataset(name, converted, out, [], move=True, shown_as=str(archive))


def convert_and_build(name: str, source: Path, out: Path, categories: list[str], *, move: bool, shown_as: str) -> list[ManifestRow]:
    """A publisher's layout at `source` (converters.CONVERTERS[name]) -> MVTec layout in scratch -> `<out>/<name>/`."""
    with _scratch_dir(out, f"{name}-convert") as converted:
        with _shown(source, shown_as):
            notes = CONVERTERS[name](source, converted / name, categories, move=move)
            _notices_along(source, converted / name)  # the licence travels with the images, as for MVTec AD and VisA
        for note in notes:
            typer.echo(f"{name}: {note}")
        return build_dataset(name, converted / name, out, [], move=True, shown_as=shown_as)


def prepare_all(params: DownloadParams, out: Path, names: list[str] | None = None) -> dict[str, list[ManifestRow]]:
    """`params` checked by config.py: known sources, each listed once, with its keys set; `names` = all when None."""
    for name in names or []:
        if name not in params.datasets:
            raise ParamsError(f"{name}: not a dataset of download.archives or download.folders; choose from {' | '.join(params.datasets)}")
    for stale in sorted(out.glob(f"{TMP_PREFIX}{'' if names is None else names[0] + '-'}*")) if out.is_dir() else []:
        shutil.rmtree(stale, ignore_errors=True)  # scratch of a run that was killed before it could clean up
    prepared = {}
    for name in params.datasets if names is None else names:
        rows = prepare_source(name, params, out)
        typer.echo(f"{name}: {manifest_summary(rows)} -> {out / name}")
        prepared[name] = rows
    return prepared


app = typer.Typer(add_completion=False, help="Prepare the datasets of params.yaml in MVTec layout with a manifest.")


@app.command(help=summary(__doc__))
def main(
    name: Optional[str] = typer.Argument(None, help="the dataset to prepare (an archive or a key of download.folders); all when left out"),
    params: Path = typer.Option(Path("params.yaml"), "--params", help="params file; its `download` block is read"),
    out: Path = typer.Option(Path("stages/download"), "--out", help="one MVTec-layout folder per dataset goes here"),
) -> None:
    try:
        prepare_all(load_params(params).download, out, None if name is None else [name])
    except (ParamsError, LayoutError, ManifestError, ImageError, DownloadError) as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(1) from None


if __name__ == "__main__":
    app()
