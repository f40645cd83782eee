"""The oracle logit bank: the oracle run once over fixed augmented views of every
training image, its logits stored for the students to read.

In the library and expert phases the oracle (0.39 GFLOPs for a WRN-16-(4,4)) costs
15-20x more per image than the students it teaches; running it once per view instead
of once per batch of every epoch is what lets the CPU budget go to the students.

A view is a crop offset and a flip (`poe_core.data.random_views`); view 0 is the plain
image. The bank stores each view's parameters with the logits, so a student reading
target (v, i) trains on exactly the image the oracle saw. Each epoch picks a view per
image at random, seeded by (seed, epoch), so resumed and joint runs stay reproducible.

A bank lives in `<work>/bank-<key>/`, where the key hashes the oracle's weights, the
images and the view recipe: another oracle or recipe gets another bank. It is written
in chunks, each flushed before a small state file records it, so an interrupted build
resumes at the first missing chunk.

In the expert phase the library is frozen, so its output on a stored view is fixed
too: `build_features` runs it once over every view (fp16, `features-<key>.npy` beside
the logits) and the experts then train on those features, which leaves their epoch the
heads' own forward and backward passes (the library's forward pass costs 27M MACs per
image, a width-0.25 head's about 1.2M).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

from poe_core.data import ImageSet, Normalize, apply_views, crop_pad, random_views
from poe_core.device import autocast
from poe_core.files import atomic_write
from poe_core.oracle import Oracle

log = logging.getLogger(__name__)

CHUNK = 500


@dataclass(frozen=True)
class ViewRecipe:
    views: int = 8
    pad: int = 4  # crop padding in pixels: `at_size` sets it from the images' size
    seed: int = 0

    def at_size(self, height: int) -> ViewRecipe:
        """This recipe for images `height` pixels high (the crop padding of poe_core.data.crop_pad)."""
        return replace(self, pad=crop_pad(height))

    def parameters(self, n: int) -> torch.Tensor:
        """(views, n, 3) crop offsets and flips; view 0 is the plain image."""
        out = torch.empty(self.views, n, 3, dtype=torch.int64)
        out[0] = torch.tensor([self.pad, self.pad, 0])
        for v in range(1, self.views):
            out[v] = random_views(n, torch.Generator().manual_seed(self.seed * 7919 + v), self.pad)
        return out


def images_fingerprint(images: ImageSet) -> str:
    h = hashlib.sha256()
    h.update(images.x.contiguous().numpy().tobytes())
    h.update(images.y.numpy().astype(np.int64).tobytes())
    return h.hexdigest()


def bank_key(oracle: Oracle, images: ImageSet, recipe: ViewRecipe) -> str:
    doc = {"oracle": oracle.fingerprint, "images": images_fingerprint(images), "recipe": asdict(recipe),
           "mean": list(oracle.mean), "std": list(oracle.std), "classes": oracle.classes}
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class LogitBank:
    """fp16 logits (views, N, C) and the view parameters (views, N, 3), in memory;
    with `features` (views, N, C', H', W', fp16, memory-mapped: see `build_features`),
    its batches carry the frozen library's features of each view instead of the images."""

    logits: torch.Tensor
    views: torch.Tensor
    recipe: ViewRecipe
    key: str
    features: np.ndarray | None = None

    def batches(
        self, images: ImageSet, batch_size: int, *, seed: int, normalize: Normalize,
        device: torch.device, channels_last: bool = True,
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Shuffled (x, y, oracle logits) batches: one random stored view per image;
        x is the normalised view, or its library features when the bank has them."""
        n = len(images)
        if self.logits.shape[1] != n:
            raise ValueError(f"the bank holds {self.logits.shape[1]} images, the training set {n}")
        g = torch.Generator().manual_seed(seed)
        order = torch.randperm(n, generator=g)
        choice = torch.randint(0, self.recipe.views, (n,), generator=g)
        for start in range(0, n, batch_size):
            idx = order[start:start + batch_size]
            v = choice[idx]
            targets = self.logits[v, idx].to(device).float()
            if self.features is not None:
                f = torch.from_numpy(self.features[v.numpy(), idx.numpy()]).to(device).float()
                yield (f.contiguous(memory_format=torch.channels_last) if channels_last else f), \
                    images.y[idx].to(device), targets
                continue
            x = apply_views(images.x[idx], self.views[v, idx], self.recipe.pad).to(device, non_blocking=True)
            x = normalize(x)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            yield x, images.y[idx].to(device), targets


def _fill(store: np.ndarray, units: list[tuple[int, int]], chunk: Callable[[int, int], np.ndarray], state: dict,
          state_path: Path, what: str, progress: Callable[[int, int], None] | None) -> None:
    """Compute the (view, first image) chunks `units` not yet done into the memory-mapped
    `store`, each flushed before the state file records it: an interrupted fill resumes
    at the first missing chunk."""
    if state["done"] < len(units):
        log.info("%s: %d of %d chunks to compute", what, len(units) - state["done"], len(units))
    for i in range(state["done"], len(units)):
        v, s = units[i]
        store[v, s:s + CHUNK] = chunk(v, s)
        store.flush()
        state["done"] = i + 1
        atomic_write(state_path, json.dumps(state))
        if progress is not None:
            progress(i + 1, len(units))


def build_bank(
    oracle: Oracle, images: ImageSet, recipe: ViewRecipe, work: Path, *, device: torch.device,
    precision: str = "fp32", progress: Callable[[int, int], None] | None = None,
) -> LogitBank:
    """Fill (or resume filling) the bank of `oracle` on `images` in `work`; return it."""
    key = bank_key(oracle, images, recipe)
    root = work / f"bank-{key}"
    root.mkdir(parents=True, exist_ok=True)
    n, c = len(images), len(oracle.classes)
    views = recipe.parameters(n)
    state_path = root / "state.json"
    state = json.loads(state_path.read_text()) if state_path.is_file() else None
    logits_path = root / "logits.npy"
    if state is None:
        np.save(root / "views.npy", views.numpy().astype(np.int16))
        np.lib.format.open_memmap(logits_path, mode="w+", dtype=np.float16, shape=(recipe.views, n, c)).flush()
        state = {"key": key, "recipe": asdict(recipe), "images": n, "classes": c,
                 "oracle": oracle.fingerprint, "done": 0}
        atomic_write(state_path, json.dumps(state))
    store = np.load(logits_path, mmap_mode="r+")
    units = [(v, s) for v in range(recipe.views) for s in range(0, n, CHUNK)]

    def chunk(v: int, s: int) -> np.ndarray:
        x = apply_views(images.x[s:s + CHUNK], views[v, s:s + CHUNK], recipe.pad).to(device)
        return oracle.logits(x, precision).cpu().numpy()

    _fill(store, units, chunk, state, state_path, f"logit bank {key}", progress)
    del store
    return LogitBank(torch.from_numpy(np.load(logits_path)), views, recipe, key)


def module_fingerprint(module: torch.nn.Module) -> str:
    """sha256 over a module's state (names, dtypes, shapes and values)."""
    h = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def build_features(
    library: torch.nn.Module, bank: LogitBank, images: ImageSet, work: Path, *, normalize: Normalize,
    device: torch.device, precision: str = "fp32", progress: Callable[[int, int], None] | None = None,
    compute: bool = True,
) -> LogitBank:
    """The bank with the frozen `library`'s features of every stored view, computed (or
    resumed) chunk by chunk into `work/bank-<bank key>/features-<key>.npy`, keyed by
    the library's weights, the normalisation and the precision they were computed in.
    With `compute=False` only finished features are used: else the bank comes back as is
    (computing them costs one library pass per view, which pays only over more epochs)."""
    doc = {"bank": bank.key, "library": module_fingerprint(library), "precision": precision,
           "mean": normalize.mean.flatten().tolist(), "std": normalize.std.flatten().tolist()}
    key = hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:16]
    root = work / f"bank-{bank.key}"
    root.mkdir(parents=True, exist_ok=True)
    path, state_path = root / f"features-{key}.npy", root / f"features-{key}.json"
    views, n = bank.recipe.views, len(images)
    library.eval()
    state = json.loads(state_path.read_text()) if state_path.is_file() else None
    units = [(v, s) for v in range(views) for s in range(0, n, CHUNK)]
    if not compute and (state is None or state["done"] < len(units)):
        return bank
    if state is None:
        with torch.no_grad():
            shape = tuple(library(normalize(images.x[:1].to(device))).shape[1:])
        np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=(views, n, *shape)).flush()
        state = doc | {"key": key, "shape": list(shape), "done": 0}
        atomic_write(state_path, json.dumps(state))
    store = np.load(path, mmap_mode="r+")

    def chunk(v: int, s: int) -> np.ndarray:
        x = normalize(apply_views(images.x[s:s + CHUNK], bank.views[v, s:s + CHUNK], bank.recipe.pad).to(device))
        with torch.no_grad(), autocast(device, precision):
            return library(x.contiguous(memory_format=torch.channels_last)).float().cpu().numpy()

    _fill(store, units, chunk, state, state_path, f"library features {key}", progress)
    del store
    return replace(bank, features=np.load(path, mmap_mode="r"))
