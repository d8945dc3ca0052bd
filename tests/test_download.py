"""Tests for d2dprompt.pipeline.download: sample/folder sources, archive download (resume, checksum), safe extraction, VisA."""

from __future__ import annotations

import csv
import hashlib
import io
import shutil
import tarfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image
from typer.testing import CliRunner

from d2dprompt.pipeline.download import DownloadError, app, safe_extract
from d2dprompt.core.data.manifest import read_manifest, scan_mvtec_layout

SAMPLE = Path(__file__).resolve().parents[1] / "sample"
MVTEC_NAME = "mvtec_anomaly_detection.tar.xz"


# ---------------------------------------------------------------- helpers


class _Handler(BaseHTTPRequestHandler):
    """Serves `server.files` by path; honours `Range: bytes=N-`; can cut one response short."""

    def do_GET(self):  # noqa: N802 (http.server's name)
        body = self.server.files.get(self.path)
        asked = self.headers.get("Range")
        self.server.requests.append((self.path, asked))
        if body is None:
            self.send_error(404)
            return
        start = int(asked.removeprefix("bytes=").split("-")[0]) if asked else 0
        if start >= len(body):
            self.send_error(416)
            return
        self.send_response(206 if asked else 200)
        if asked:
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        self.send_header("Content-Length", str(len(body) - start))
        self.end_headers()
        payload = body[start:]
        if self.server.cut_after is not None:  # simulate a dropped connection, once
            payload, self.server.cut_after = payload[: self.server.cut_after], None
        self.wfile.write(payload)

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.files, httpd.requests, httpd.cut_after = {}, [], None
    httpd.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()
    thread.join(timeout=5)


def run_cli(tmp_path: Path, download: dict, out: Path | None = None, name: str | None = None):
    params = tmp_path / "params.yaml"
    download = {"folders": {}, **download} if "archives" in download else download
    names = [*download.get("archives", []), *download.get("folders", {"sample": None})]  # train and evaluate read what download prepares
    params.write_text(yaml.safe_dump({"download": download, "train": {"datasets": names[:1]}, "evaluate": {"datasets": names[:1]}}))
    out = out or tmp_path / "out"
    return CliRunner().invoke(app, [*([name] if name else []), "--params", str(params), "--out", str(out)])


def error_line(result) -> str:
    """The one line a failed run leaves after the progress bars on stderr (and no traceback), less its 'error: '."""
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit) and "Traceback" not in result.output
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("error: "), line
    return line.removeprefix("error: ")


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def leftovers(out: Path) -> list[str]:
    return [p.name for p in out.iterdir() if p.name.startswith(".")] if out.exists() else []


def mvtec_subset_archive(mode: str = "w:xz") -> bytes:
    """A small MVTec-style archive: the sample's `tile` category (a few images per folder) + a licence file."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode=mode) as tar:
        data = b"licence text"
        info = tarfile.TarInfo("license.txt")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
        for folder in ("train/good", "test/good", "test/crack", "test/stain"):
            for image in sorted((SAMPLE / "tile" / folder).glob("*.png"))[:2]:
                tar.add(image, arcname=f"tile/{folder}/{image.name}")
                if "good" not in folder:
                    mask = SAMPLE / "tile" / "ground_truth" / folder.split("/")[1] / f"{image.stem}_mask.png"
                    tar.add(mask, arcname=f"tile/ground_truth/{folder.split('/')[1]}/{mask.name}")
    return buffer.getvalue()


def mvtec_params(server, archive: bytes, tmp_path: Path, **overrides) -> dict:
    server.files["/" + MVTEC_NAME] = archive
    return {
        "archives": ["mvtec"],
        "mvtec_url": f"{server.url}/{MVTEC_NAME}",
        "mvtec_sha256": sha256(archive),
        "archive_dir": str(tmp_path / "archives"),
        **overrides,
    }


# ---------------------------------------------------------------- sample and folder sources


@pytest.fixture
def sample_copy(tmp_path) -> Path:
    assert SAMPLE.is_dir(), "run `python scripts/make_sample.py --out sample` first"
    return Path(shutil.copytree(SAMPLE, tmp_path / "sample"))


def test_sample_source_end_to_end(tmp_path, sample_copy):
    result = run_cli(tmp_path, {"folders": {"sample": str(sample_copy)}})
    assert result.exit_code == 0, result.output
    out = tmp_path / "out" / "sample"
    rows = read_manifest(out / "manifest.csv")
    images = sorted(p.relative_to(sample_copy).as_posix() for p in sample_copy.glob("*/[tt][re]*/*/*.png"))
    assert sorted(r.image_path for r in rows) == images
    assert rows == scan_mvtec_layout(sample_copy, "sample")
    for row in rows:
        assert (out / row.image_path).read_bytes() == (sample_copy / row.image_path).read_bytes()
        if row.label:
            assert (out / row.mask_path).is_file()
    assert {r.category for r in rows} >= {"tile", "weave", "disc"}
    assert (out / "README.md").is_file()
    assert result.stdout.startswith("sample: 3 categories (disc, tile, weave), train 48")
    assert leftovers(tmp_path / "out") == []

    (tmp_path / "out" / ".tmp-sample-killed").mkdir()  # scratch of a killed run is cleared by the next one
    again = run_cli(tmp_path, {"folders": {"sample": str(sample_copy)}, "categories": ["disc"]})
    assert again.exit_code == 0, again.output
    assert {r.category for r in read_manifest(out / "manifest.csv")} == {"disc"}
    assert not (out / "tile").exists()  # the older output was replaced, not merged
    assert leftovers(tmp_path / "out") == []


def test_corrupt_image_stops_and_keeps_previous_output(tmp_path, sample_copy):
    assert run_cli(tmp_path, {"folders": {"sample": str(sample_copy)}}).exit_code == 0
    manifest_before = (tmp_path / "out" / "sample" / "manifest.csv").read_bytes()
    victim = sample_copy / "weave" / "test" / "hole" / "002.png"
    victim.write_bytes(victim.read_bytes()[:300])
    result = run_cli(tmp_path, {"folders": {"sample": str(sample_copy)}})
    assert error_line(result).startswith(f"{victim}: cannot decode image")
    assert (tmp_path / "out" / "sample" / "manifest.csv").read_bytes() == manifest_before
    assert leftovers(tmp_path / "out") == []


def test_mask_of_wrong_size_is_rejected(tmp_path, sample_copy):
    mask = sample_copy / "tile" / "ground_truth" / "crack" / "001_mask.png"
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(mask)
    result = run_cli(tmp_path, {"folders": {"sample": str(sample_copy)}})
    assert error_line(result) == f"{mask}: mask is 64x64, image is 128x128"
    assert not (tmp_path / "out" / "sample").exists() and leftovers(tmp_path / "out") == []


def test_named_folders_coexist_and_each_is_prepared_alone_or_together(tmp_path, sample_copy):
    folders = {"bottles": str(sample_copy), "cans": str(sample_copy)}
    alone = run_cli(tmp_path, {"folders": folders, "categories": ["tile"]}, name="cans")  # what stage folder@cans runs
    assert alone.exit_code == 0, alone.output
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["cans"]
    assert {r.dataset for r in read_manifest(tmp_path / "out" / "cans" / "manifest.csv")} == {"cans"}
    both = run_cli(tmp_path, {"folders": folders, "categories": ["tile"]})
    assert both.exit_code == 0, both.output
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["bottles", "cans"]
    unknown = run_cli(tmp_path, {"folders": folders}, name="sample")
    assert error_line(unknown) == "sample: not a dataset of download.archives or download.folders; choose from bottles | cans"


def test_folder_errors(tmp_path, sample_copy):
    flat = tmp_path / "flat"
    flat.mkdir()
    shutil.copy(sample_copy / "tile" / "train" / "good" / "000.png", flat / "a.png")
    bad = run_cli(tmp_path, {"folders": {"mine": str(flat)}})
    assert error_line(bad).startswith(f"{flat}: not MVTec layout")

    params = tmp_path / "params.yaml"
    unknown = run_cli(tmp_path, {"archives": ["kaggle"]})
    assert error_line(unknown) == f"{params}: download.archives[0]: must be one of mvtec | visa | btad | mpdd | mvtec_ad2, got 'kaggle'"
    old = run_cli(tmp_path, {"folder_dir": str(sample_copy)})
    assert error_line(old).startswith(f"{params}: download.folder_dir: unknown key (now download.folders (name: path))")
    missing = run_cli(tmp_path, {"folders": {"sample": str(tmp_path / "gone")}})
    assert error_line(missing) == f"{tmp_path / 'gone'}: folder not found (download.folders.sample)"


# ---------------------------------------------------------------- archives over HTTP


def test_mvtec_archive_is_downloaded_verified_and_extracted(tmp_path, server):
    archive = mvtec_subset_archive()
    download = mvtec_params(server, archive, tmp_path)
    result = run_cli(tmp_path, download)
    assert result.exit_code == 0, result.output
    out = tmp_path / "out" / "mvtec"
    rows = read_manifest(out / "manifest.csv")
    assert [(r.split, r.defect_type, r.label) for r in rows] == (
        [("test", "crack", 1)] * 2 + [("test", "good", 0)] * 2 + [("test", "stain", 1)] * 2 + [("train", "good", 0)] * 2
    )
    assert all((out / r.image_path).is_file() and (not r.label or (out / r.mask_path).is_file()) for r in rows)
    assert (out / "license.txt").read_bytes() == b"licence text"
    assert (tmp_path / "archives" / MVTEC_NAME).read_bytes() == archive
    assert leftovers(tmp_path / "out") == []

    requests_before = len(server.requests)
    assert run_cli(tmp_path, download).exit_code == 0
    assert len(server.requests) == requests_before  # the kept archive is reused


def test_interrupted_download_resumes_with_range(tmp_path, server):
    archive = mvtec_subset_archive()
    download = mvtec_params(server, archive, tmp_path)
    part = tmp_path / "archives" / (MVTEC_NAME + ".part")

    server.cut_after = 5000
    cut = run_cli(tmp_path, download)
    assert error_line(cut).endswith("rerun to resume")
    assert part.stat().st_size == 5000 and not (tmp_path / "out" / "mvtec").exists()

    resumed = run_cli(tmp_path, download)
    assert resumed.exit_code == 0, resumed.output
    assert server.requests[-1] == ("/" + MVTEC_NAME, "bytes=5000-")
    assert (tmp_path / "archives" / MVTEC_NAME).read_bytes() == archive and not part.exists()


def test_resume_from_a_partial_file(tmp_path, server):
    archive = mvtec_subset_archive()
    download = mvtec_params(server, archive, tmp_path)
    part = tmp_path / "archives" / (MVTEC_NAME + ".part")
    part.parent.mkdir()
    half = len(archive) // 2
    part.write_bytes(archive[:half])
    assert run_cli(tmp_path, download).exit_code == 0
    assert server.requests == [("/" + MVTEC_NAME, f"bytes={half}-")]
    assert sha256((tmp_path / "archives" / MVTEC_NAME).read_bytes()) == sha256(archive)


def test_checksum_mismatch_is_one_clear_line_and_leaves_nothing(tmp_path, server):
    archive = mvtec_subset_archive()
    wrong = "0" * 64
    result = run_cli(tmp_path, mvtec_params(server, archive, tmp_path, mvtec_sha256=wrong))
    archive_file = tmp_path / "archives" / MVTEC_NAME
    assert error_line(result) == f"{archive_file}: sha256 mismatch, expected {wrong}, got {sha256(archive)} (file removed)"
    assert list((tmp_path / "archives").iterdir()) == []
    assert not (tmp_path / "out" / "mvtec").exists() and leftovers(tmp_path / "out") == []


def test_archive_keys_are_checked_before_any_download(tmp_path, server):
    no_url = run_cli(tmp_path, mvtec_params(server, b"x", tmp_path, mvtec_url=""))
    assert error_line(no_url) == f"{tmp_path / 'params.yaml'}: download.mvtec_url: must be set to use the 'mvtec' source"
    bad_hash = run_cli(tmp_path, mvtec_params(server, b"x", tmp_path, mvtec_sha256="abc"))
    assert error_line(bad_hash) == f"{tmp_path / 'params.yaml'}: download.mvtec_sha256: must be 64 hex digits, got 'abc'"
    assert server.requests == []


def test_unreachable_server_is_one_clear_line(tmp_path, server):
    result = run_cli(tmp_path, mvtec_params(server, b"x", tmp_path, mvtec_url=f"{server.url}/missing.tar.xz"))
    assert error_line(result) == f"{server.url}/missing.tar.xz: HTTP 404 Not Found"


# ---------------------------------------------------------------- safe extraction


def _tar_with(entries: list[tarfile.TarInfo]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for info in entries:
            tar.addfile(info, io.BytesIO(b"x" * info.size) if info.isfile() else None)
    return buffer.getvalue()


def _file(name: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = 1
    return info


def _link(name: str, target: str, kind=tarfile.SYMTYPE) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    return info


@pytest.mark.parametrize(
    "entries, culprit",
    [
        ([_file("ok.txt"), _file("../evil.txt")], "../evil.txt"),
        ([_file("/tmp/abs-evil.txt")], "/tmp/abs-evil.txt"),
        ([_link("link", "../../outside")], "link"),
        ([_link("link", "/etc/passwd")], "link"),
        ([_file("a.txt"), _link("hard", "../a.txt", tarfile.LNKTYPE)], "hard"),
        ([_link("here", "."), _link("here/up", "../outside")], "here/up"),  # escapes only through the first link
    ],
)
def test_unsafe_entries_are_refused(tmp_path, entries, culprit):
    archive = tmp_path / "evil.tar"
    archive.write_bytes(_tar_with(entries))
    dest = tmp_path / "box" / "dest"
    with pytest.raises(DownloadError) as info:
        safe_extract(archive, dest)
    assert str(info.value).startswith(f"{archive}: unsafe entry '{culprit}'")
    inside = [p.name for p in dest.rglob("*")]
    assert sorted(p.name for p in tmp_path.rglob("*")) == sorted(["evil.tar", "box", "dest", *inside])  # nothing outside
    assert not (tmp_path / "evil.txt").exists() and not (tmp_path / "box" / "outside").exists()


def test_links_inside_the_archive_are_allowed(tmp_path):
    archive = tmp_path / "fine.tar"
    entries = [_file("d/a.txt"), _link("d/b.txt", "a.txt"), _link("c.txt", "d/a.txt", tarfile.LNKTYPE)]
    archive.write_bytes(_tar_with(entries))
    safe_extract(archive, tmp_path / "dest")
    assert (tmp_path / "dest" / "d" / "b.txt").read_bytes() == b"x" == (tmp_path / "dest" / "c.txt").read_bytes()


def test_unsafe_archive_through_the_cli_leaves_nothing(tmp_path, server):
    archive = _tar_with([_file("tile/train/good/000.png"), _file("../evil.png")])
    result = run_cli(tmp_path, mvtec_params(server, archive, tmp_path))
    assert error_line(result) == f"{tmp_path / 'archives' / MVTEC_NAME}: unsafe entry '../evil.png' ('..' in path)"
    assert not (tmp_path / "out" / "mvtec").exists() and leftovers(tmp_path / "out") == []
    assert not (tmp_path / "evil.png").exists() and not (tmp_path / "out" / "evil.png").exists()


# ---------------------------------------------------------------- VisA


def fake_visa_archive(root: Path, encoding: str = "utf-8") -> tuple[bytes, dict[str, np.ndarray]]:
    """Two categories in VisA's layout with split_csv/1cls.csv (written in `encoding`); masks hold class id 1.
    Returns (tar, masks)."""
    rng = np.random.default_rng(0)
    records, masks = [], {}
    for category in ("candle", "pcb1"):
        base = root / "VisA" / category / "Data"
        for split, label, count in (("train", "normal", 3), ("test", "normal", 1), ("test", "anomaly", 2)):
            for i in range(count):
                folder = "Normal" if label == "normal" else "Anomaly"
                name = f"{i:04d}" if split == "train" else f"{split}{i:03d}"
                image = base / "Images" / folder / f"{name}.JPG"
                image.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)).save(image, quality=90)
                mask_rel = ""
                if label == "anomaly":
                    mask = np.zeros((40, 56), np.uint8)
                    mask[5 + i : 15 + i, 10:30] = 1
                    mask_path = base / "Masks" / "Anomaly" / f"{name}.png"
                    mask_path.parent.mkdir(parents=True, exist_ok=True)
                    Image.fromarray(mask).save(mask_path)
                    mask_rel = mask_path.relative_to(root / "VisA").as_posix()
                    masks[f"{category}/{name}"] = mask > 0
                records.append([category, split, label, image.relative_to(root / "VisA").as_posix(), mask_rel])
    (root / "VisA" / "split_csv").mkdir()
    with (root / "VisA" / "split_csv" / "1cls.csv").open("w", newline="", encoding=encoding) as fh:
        csv.writer(fh).writerows([["object", "split", "label", "image", "mask"], *records])
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for item in sorted((root / "VisA").iterdir()):
            tar.add(item, arcname=item.name)
    return buffer.getvalue(), masks


def test_a_split_csv_saved_with_a_byte_order_mark_is_read(tmp_path, server):
    """A 1cls.csv saved by a spreadsheet (UTF-8 with a byte-order mark) was refused with "columns must include image,
    label, mask, object, split" although they are there: the mark glued itself to the first column's name."""
    archive, _ = fake_visa_archive(tmp_path / "build", encoding="utf-8-sig")
    server.files["/VisA_20220922.tar"] = archive
    result = run_cli(tmp_path, {"archives": ["visa"], "visa_url": f"{server.url}/VisA_20220922.tar", "visa_sha256": sha256(archive),
                                "archive_dir": str(tmp_path / "archives")})
    assert result.exit_code == 0, result.output
    assert len(read_manifest(tmp_path / "out" / "visa" / "manifest.csv")) == 12


def test_visa_archive_is_converted_to_mvtec_layout(tmp_path, server):
    archive, masks = fake_visa_archive(tmp_path / "build")
    server.files["/VisA_20220922.tar"] = archive
    download = {
        "archives": ["visa"],
        "visa_url": f"{server.url}/VisA_20220922.tar",
        "visa_sha256": sha256(archive),
        "archive_dir": str(tmp_path / "archives"),
    }
    result = run_cli(tmp_path, download)
    assert result.exit_code == 0, result.output
    out = tmp_path / "out" / "visa"
    rows = read_manifest(out / "manifest.csv")
    assert len(rows) == 12 and {r.category for r in rows} == {"candle", "pcb1"}
    assert sum(r.split == "train" for r in rows) == 6 and sum(r.label for r in rows) == 4
    assert {r.defect_type for r in rows if r.label} == {"bad"}
    for row in (r for r in rows if r.label):
        mask = np.asarray(Image.open(out / row.mask_path))
        assert mask.dtype == np.uint8 and set(np.unique(mask)) == {0, 255}
        stem = Path(row.image_path).stem
        assert row.mask_path == f"{row.category}/ground_truth/bad/{stem}_mask.png"
        np.testing.assert_array_equal(mask > 0, masks[f"{row.category}/{stem}"])
    assert (out / "candle" / "train" / "good" / "0000.JPG").is_file()

    only = run_cli(tmp_path, {**download, "categories": ["pcb1"]})
    assert only.exit_code == 0, only.output
    assert {r.category for r in read_manifest(out / "manifest.csv")} == {"pcb1"}
    typo = run_cli(tmp_path, {**download, "categories": ["pcb9"]})
    assert "no category pcb9 (found: candle, pcb1)" in error_line(typo)
