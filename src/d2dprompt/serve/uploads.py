"""What the app does with uploads (serve/app.py): Gradio stores each at <GRADIO_TEMP_DIR>/<sha256 of its bytes>/<name>.

- `UploadBudget`: ASGI middleware in front of Gradio's upload route; bounds one post and all stored uploads;
- `start_sweeper`: deletes uploads no request claimed after --unclaimed-s;
- `claimed_uploads` / `remember_uploads` / `RecentUploads`: identical uploads share one file, deleted by the first
  request to finish: the others read its bytes, kept in memory for a while;
- `delete_uploads`: a request's uploads, deleted once scored or refused.
"""

from __future__ import annotations

import stat
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from d2dprompt.serve.app import Limits

# Gradio stores an upload at <sha256 of its bytes>/<name>: identical uploads share one file, which the first request
# to finish deletes. The bytes of the uploads scored in the last RECENT_S seconds stay in memory (at most RECENT_MB)
# so that a request holding the same path still gets its image.
RECENT_S = 600
RECENT_MB = 64
# Uploads no request has claimed (posted to /gradio_api/upload but never sent to /detect) are deleted after UNCLAIMED_S,
# and all uploads on disk together stay under PENDING_REQUESTS requests' worth (--max-images x --max-mb each): past
# that, a new upload is refused with 503 until detection or the sweep frees room. One POST holds at most one request's
# worth (413), and must say its length (411), so the bound holds before a byte is stored.
UNCLAIMED_S = 300
PENDING_REQUESTS = 4
SWEEP_EVERY_S = 10
MULTIPART_SLACK = 2**20  # a multipart body's boundaries and headers beside the files


def delete_uploads(paths: list[str], upload_root: Path) -> None:
    """Delete the uploaded files Gradio stored for a request (only ever files under its upload folder)."""
    root = upload_root.resolve()
    for path in map(Path, paths):
        if path.resolve().is_relative_to(root):
            path.unlink(missing_ok=True)
            folder = path.parent
            if folder.resolve() != root and folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()  # Gradio stores each upload in a folder of its own


class RecentUploads:
    """The bytes of recently deleted uploads by their path (content-addressed: one path, one content), for at most
    `ttl_s` seconds and `max_bytes` in all, the oldest dropped first. Thread-safe: Gradio runs requests in threads."""

    def __init__(self, ttl_s: float = RECENT_S, max_bytes: int = RECENT_MB * 2**20):
        self.ttl_s, self.max_bytes = ttl_s, max_bytes
        self._kept: OrderedDict[str, tuple[float, bytes]] = OrderedDict()  # oldest first
        self._bytes = 0
        self._lock = threading.Lock()

    def keep(self, path: str, data: bytes) -> None:
        if len(data) > self.max_bytes:
            return
        with self._lock:
            self._pop(path)
            self._kept[path] = (time.monotonic(), data)
            self._bytes += len(data)
            self._expire()

    def get(self, path: str) -> bytes | None:
        with self._lock:
            self._expire()
            found = self._kept.get(path)
        return None if found is None else found[1]

    def _pop(self, path: str) -> None:
        _, data = self._kept.pop(path, (0.0, b""))
        self._bytes -= len(data)

    def _expire(self) -> None:
        """Drop entries older than ttl_s, then the oldest until the bytes fit max_bytes."""
        now = time.monotonic()
        while self._kept:
            path, (stamp, _) = next(iter(self._kept.items()))
            if now - stamp <= self.ttl_s and self._bytes <= self.max_bytes:
                break
            self._pop(path)


def claimed_uploads(uploaded: list[str], recent: RecentUploads, folder: Path) -> tuple[list[tuple[str, Path]], list[str]]:
    """(name, a readable path) of each upload: the stored file, or, when an identical upload's request deleted it,
    its recent bytes written to `folder`; and a line for each that is gone, naming no server path."""
    items, gone = [], []
    for upload in map(Path, uploaded):
        if upload.is_file():
            items.append((upload.name, upload))
            continue
        data = recent.get(str(upload))
        if data is None:
            gone.append(f"- {upload.name}: this upload is no longer on the server (an identical one was scored over "
                        f"{RECENT_S // 60} min ago and deleted); send it again")
            continue
        restored = folder / uuid.uuid4().hex / upload.name
        restored.parent.mkdir(parents=True)
        restored.write_bytes(data)
        items.append((upload.name, restored))
    return items, gone


def remember_uploads(uploaded: list[str], recent: RecentUploads, limits: Limits) -> None:
    """Keep the bytes of each stored upload that fits the upload limit before it is deleted (RecentUploads)."""
    for upload in map(Path, uploaded):
        try:
            if upload.stat().st_size <= limits.max_mb * 2**20:
                recent.keep(str(upload), upload.read_bytes())
        except OSError:
            continue


def stored_files(upload_root: Path) -> list[tuple[float, int, Path]]:
    """(mtime, bytes, path) of every file under Gradio's folder (uploads and its cache of served files), oldest first:
    a walk of what is on disk, whatever the number of uploads the app has seen."""
    found = []
    for path in upload_root.rglob("*"):
        try:
            info = path.stat()
        except OSError:  # deleted meanwhile
            continue
        if stat.S_ISREG(info.st_mode):
            found.append((info.st_mtime, info.st_size, path))
    return sorted(found)


def sweep_uploads(upload_root: Path, uploads: set[str], older_than_s: float, now: float | None = None) -> int:
    """Delete the stored uploads older than `older_than_s` (never claimed by a request); returns how many."""
    now = time.time() if now is None else now
    old = [str(path) for mtime, _, path in stored_files(upload_root) if now - mtime > older_than_s and str(path) in uploads]
    delete_uploads(old, upload_root)  # Gradio's record keeps the names, as it does for every upload once scored
    return len(old)


def start_sweeper(upload_root: Path, uploads: Callable[[], set[str]], older_than_s: float, every_s: float = SWEEP_EVERY_S) -> threading.Event:
    """A daemon thread running sweep_uploads every `every_s`; set the returned event to stop it."""
    stop = threading.Event()

    def loop() -> None:
        while not stop.wait(every_s):
            sweep_uploads(upload_root, uploads(), older_than_s)

    threading.Thread(target=loop, name="upload-sweeper", daemon=True).start()
    return stop


class UploadBudget:
    """ASGI middleware in front of Gradio's upload route: a POST must state its length (411), hold at most one
    request's worth of files (413), and fit beside the uploads already stored (503); see PENDING_REQUESTS."""

    def __init__(self, app, limits: Limits, upload_root: Path):
        self.app, self.upload_root = app, upload_root
        self.per_post = int(limits.max_images * limits.max_mb * 2**20) + MULTIPART_SLACK
        self.in_all = PENDING_REQUESTS * self.per_post

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["method"] == "POST" and scope["path"].rstrip("/").endswith("/gradio_api/upload"):
            refusal = self.refusal(dict(scope["headers"]).get(b"content-length"))
            if refusal is not None:
                status, text = refusal
                await send({"type": "http.response.start", "status": status, "headers": [(b"content-type", b"text/plain; charset=utf-8")]})
                await send({"type": "http.response.body", "body": text.encode()})
                return
        await self.app(scope, receive, send)

    def refusal(self, length: bytes | None) -> tuple[int, str] | None:
        if length is None or not length.isdigit():
            return 411, "an upload must state its Content-Length"
        size = int(length)
        if size > self.per_post:
            return 413, f"{size / 2**20:.1f} MB in one upload; at most {self.per_post / 2**20:.1f} MB (--max-images x --max-mb)"
        stored = sum(n for _, n, _ in stored_files(self.upload_root))  # served files count too: the bound stays a bound
        if stored + size > self.in_all:
            return 503, "too many uploads waiting to be scored; send them for detection or try again in a few minutes"
        return None
