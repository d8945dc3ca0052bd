"""Cached cross-attention queries for cached-query training: one row per training latent.

On disk (`stages/queries/`): `queries.safetensors` holds, per captured layer, a tensor (N, passes, heads, HW, d)
(row-major in N so one row is one contiguous read), and `keys.txt` the training-row keys in the same order, checked
against the training set before use. The tensor is fp16 (attention.cache_dtype float16), or int8 with a fp16 scale
per row, pass, head and channel beside it (`<layer>.scale`, (N, passes, heads, 1, d); int8): symmetric per-channel
quantisation, q = int8 x scale, at about half the bytes (BENCHMARKS.md: the maps' drift it adds).

Training reads it one of two ways (attention.cache_resident_gb): resident, the whole file read once onto the
training device so that a batch is an index there, or streamed, each batch's rows read from the file, the next
batches' in a background thread while the current step runs (`prefetch`). Both hand over the same fp16 values.
"""

from __future__ import annotations

from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from d2dprompt.core.runtime import distributed
from d2dprompt.core.runtime.outputs import atomic_file
from d2dprompt.methods.d2dprompt.model import D2DSegmenter

QUERIES_FILE, KEYS_FILE = "queries.safetensors", "keys.txt"
PREFETCH_DEPTH = 2  # batches read ahead of the step: one in flight while the next waits; more only holds memory
SCALE = ".scale"  # suffix of an int8 layer's per-channel scales
INT8_MAX = 127  # symmetric: -127..127, so that 0 stays exact and the range is the same either side
STORED = {torch.float16: "F16", torch.int8: "I8"}  # what a cache holds, in safetensors' dtype names


def quantised(q: torch.Tensor) -> dict[str, torch.Tensor]:
    """(B, passes, heads, HW, d) queries -> int8 values and fp16 scales (B, passes, heads, 1, d): each channel of
    a head's HW cells scaled by its own largest magnitude (a channel's range differs by orders of magnitude across
    channels, not across cells)."""
    wanted = (q.float().abs().amax(dim=-2, keepdim=True) / INT8_MAX).clamp_(min=2.0**-24)  # fp16's smallest step: no 0/0
    scale = wanted.half()
    scale = torch.where(scale.float() < wanted, torch.nextafter(scale, torch.full_like(scale, torch.inf)), scale)  # rounded up: no clipping
    return {"": (q.float() / scale.float()).round_().clamp_(-INT8_MAX, INT8_MAX).to(torch.int8), SCALE: scale}


def stored_form(q: torch.Tensor, name: str, dtype: str) -> dict[str, torch.Tensor]:
    """One layer's (B, passes, heads, HW, d) queries as the cache keeps them: fp16, or int8 + its scales."""
    if dtype == "float16":
        return {name: q.half()}
    if dtype == "int8":
        return {name + suffix: t for suffix, t in quantised(q).items()}
    raise ValueError(f"attention.cache_dtype: {dtype!r}; expected float16 or int8")


class QueryCache:
    """Rows of queries, held in memory (fresh, or `resident`) or read row by row from a safetensors file."""

    def __init__(self, tensors: dict[str, torch.Tensor] | None = None, path: Path | None = None):
        self._tensors = tensors
        self._file = safe_open(str(path), framework="pt") if path is not None else None
        self.stored = list(tensors) if tensors is not None else list(self._file.keys())  # layers and their scales
        self.names = [name for name in self.stored if not name.endswith(SCALE)]
        self._plan: deque[torch.Tensor] = deque()
        self._ahead: deque = deque()  # (rows, future of their host tensors), in plan order
        self._pool: ThreadPoolExecutor | None = None

    @property
    def nbytes(self) -> int:
        if self._tensors is not None:
            return sum(t.numel() * t.element_size() for t in self._tensors.values())
        total = 0
        for name in self.stored:
            sliced = self._file.get_slice(name)
            count = 1
            for side in sliced.get_shape():
                count *= side
            total += count * {"F16": 2, "I8": 1}[sliced.get_dtype()]
        return total

    def resident(self, device: torch.device) -> QueryCache:
        """Every row on `device` (as stored: fp16, or int8 and scales), read in one pass."""
        tensors = self._tensors if self._tensors is not None else {name: self._file.get_tensor(name) for name in self.stored}
        return QueryCache({name: t.to(device) for name, t in tensors.items()})

    def prefetch(self, batches: list[torch.Tensor]) -> None:
        """Read the rows of `batches`, in this order, in a background thread ahead of the `batch` calls that ask for
        them (streamed caches only; a resident one has nothing to read). A call for other rows reads them itself."""
        if self._file is None:
            return
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="query-prefetch")
        self._plan, self._ahead = deque(batches), deque()
        self._fill()

    def _fill(self) -> None:
        while self._plan and len(self._ahead) < PREFETCH_DEPTH:
            rows = self._plan.popleft()
            self._ahead.append((rows, self._pool.submit(self._read, rows)))

    def _read(self, rows: torch.Tensor) -> dict[str, torch.Tensor]:
        """stored name -> (B, ...) as stored on the host, pinned when a GPU will take it."""
        out = {}
        for name in self.stored:
            sliced = self._file.get_slice(name)
            q = torch.stack([sliced[int(r) : int(r) + 1][0] for r in rows])
            out[name] = q.pin_memory() if torch.cuda.is_available() else q
        return out

    def batch(self, rows: torch.Tensor, device: torch.device) -> dict[str, torch.Tensor]:
        """name -> (passes, B, heads, HW, d) float32 on `device`."""
        if self._tensors is not None:
            held = {name: t[rows.to(t.device)] for name, t in self._tensors.items()}
        elif self._ahead and torch.equal(self._ahead[0][0], rows):
            held = self._ahead.popleft()[1].result()
            self._fill()
        else:
            held = self._read(rows)
        out = {}
        for name in self.names:
            q = held[name].to(device, non_blocking=True).float()
            if name + SCALE in held:
                q = q * held[name + SCALE].to(device, non_blocking=True).float()
            out[name] = q.transpose(0, 1)
        return out


@torch.no_grad()
def compute_queries(
    segmenter: D2DSegmenter, latents: torch.Tensor, noise: torch.Tensor, batch_size: int, device: torch.device, desc: str = "queries",
    dtype: str = "float16",
) -> dict[str, torch.Tensor]:
    """stored name -> (N, passes, heads, HW, d) on the CPU as the cache keeps it (`dtype`: stored_form), for the
    segmenter's current prompts."""
    parts: dict[str, list[torch.Tensor]] = {}
    for start in tqdm(range(0, latents.shape[0], batch_size), desc=desc, unit="batch", leave=False, disable=not distributed.is_main()):
        q = segmenter.compute_queries(latents[start : start + batch_size].to(device), noise[start : start + batch_size].to(device))
        for name, value in q.items():
            for stored, t in stored_form(value.transpose(0, 1), name, dtype).items():
                parts.setdefault(stored, []).append(t.cpu())
    return {name: torch.cat(chunks).contiguous() for name, chunks in parts.items()}


@torch.no_grad()
def write_queries(segmenter: D2DSegmenter, latents: torch.Tensor, noise: torch.Tensor, batch_size: int, device: torch.device,
                  path: Path, desc: str = "queries", dtype: str = "float16") -> dict[str, tuple[tuple[int, ...], str]]:
    """compute_queries straight into a safetensors file at `path`, batch by batch: memory holds one batch, whatever
    the number of rows (holding them all took 21.9 MiB per row at SD-2.1 size, 47 GB for VisA). The file has the
    bytes save_file writes for the same tensors. Returns each stored tensor's shape and dtype."""
    import json

    rows = latents.shape[0]
    with open(path, "wb") as fh:
        layout, start_of_data = None, 0
        for start in tqdm(range(0, rows, batch_size), desc=desc, unit="batch", leave=False):
            q = segmenter.compute_queries(latents[start : start + batch_size].to(device), noise[start : start + batch_size].to(device))
            batch = {stored: t.cpu().contiguous() for name, value in q.items() for stored, t in stored_form(value.transpose(0, 1), name, dtype).items()}
            if layout is None:  # the first batch gives each layer's row shape: the header, then the whole file's size
                layout, offset = {}, 0
                # save_file's order: the wider dtype first, then by name
                for name in sorted(batch, key=lambda n: (-batch[n].element_size(), n)):
                    shape = (rows, *batch[name].shape[1:])
                    row_bytes = batch[name][0].numel() * batch[name].element_size()
                    layout[name] = {"dtype": STORED[batch[name].dtype], "shape": list(shape), "data_offsets": [offset, offset + rows * row_bytes]}
                    offset += rows * row_bytes
                header = json.dumps(layout, separators=(",", ":")).encode()
                header += b" " * (-len(header) % 8)  # safetensors aligns the data to 8 bytes
                fh.write(len(header).to_bytes(8, "little") + header)
                start_of_data = fh.tell()
                fh.truncate(start_of_data + offset)
            for name, value in batch.items():
                begin, end = layout[name]["data_offsets"]
                fh.seek(start_of_data + begin + start * (end - begin) // rows)
                fh.write(value.view(torch.uint8).numpy().tobytes())
    if layout is None:
        raise ValueError("no training rows to cache queries of")
    return {name: (tuple(entry["shape"]), entry["dtype"]) for name, entry in layout.items()}


def compute_queries_shared(
    segmenter: D2DSegmenter, latents: torch.Tensor, noise: torch.Tensor, batch_size: int, device: torch.device, desc: str = "queries",
    to_all: bool = False, dtype: str = "float16",
) -> dict[str, torch.Tensor] | None:
    """compute_queries split over the processes (distributed.py), whole batches each, gathered in row order on
    rank 0 (None on the others) or, with `to_all`, on every process. One process: compute_queries itself."""
    if distributed.world_size() == 1:
        return compute_queries(segmenter, latents, noise, batch_size, device, desc, dtype)
    part = distributed.shard(latents.shape[0], batch_size)
    mine = compute_queries(segmenter, latents[part.start : part.stop], noise[part.start : part.stop], batch_size, device, desc, dtype)
    suffixes = ("", SCALE) if dtype == "int8" else ("",)
    gathered = {name + suffix: distributed.gather(mine.get(name + suffix), to_all) for name in segmenter.captured for suffix in suffixes}
    return gathered if to_all or distributed.is_main() else None


def save_queries(tensors: dict[str, torch.Tensor], keys: list[str], folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    with atomic_file(folder / QUERIES_FILE) as tmp:
        save_file(tensors, tmp)
    with atomic_file(folder / KEYS_FILE) as tmp:
        tmp.write_text("".join(f"{k}\n" for k in keys))


def open_queries(folder: Path, keys: list[str]) -> QueryCache:
    """The queries stage output, checked to belong to exactly these training rows."""
    for name in (QUERIES_FILE, KEYS_FILE):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{folder / name}: missing; run the queries stage (attention.mode=cached)")
    stored = (folder / KEYS_FILE).read_text().splitlines()
    if stored != keys:
        raise ValueError(f"{folder / KEYS_FILE}: rows differ from the training set; rerun the queries stage")
    return QueryCache(path=folder / QUERIES_FILE)
