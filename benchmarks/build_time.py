"""Where a pool build's wall time went, phase by phase, against issue 8's time targets
(a full build from nothing within 150 min on a CPU with AMX, a rebuild from a kept oracle
within 60 min on any kind), read off a finished work directory and its pool.

    python benchmarks/build_time.py --work var/w-full --pool var/pool-full [--start 2026-12-07T23:25:27]

Every phase records the seconds it trained; the steps between them (the logit bank, the
library's features, writing the pool) record none, so they are read off the times their
files were last written: the bank's `state.json`, the features' `.json`, the phases'
`<phase>.json`, the pool's `manifest.json`. The build starts at `--start` (the time
`poe extract` was started; default: the oracle's end minus its recorded seconds, which
leaves out the few seconds of loading the data set). A work directory seeded from a pool
or a kept oracle has no oracle phase of its own to time: only the rebuild is printed.
Run it after the build, not beside it: it only reads files.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
from pathlib import Path

FULL_TARGET_MIN, REBUILD_TARGET_MIN = 150, 60


def _mtime(path: Path) -> float:
    return path.stat().st_mtime


def _info(work: Path, phase: str) -> dict:
    return json.loads((work / f"{phase}.json").read_text())


def timeline(work: Path, pool: Path, start: float | None) -> list[tuple[str, float, float]]:
    """(step, started, ended) in seconds since the epoch, in build order."""
    oracle = _info(work, "oracle")
    oracle_end = _mtime(work / "oracle.json")
    trained_here = oracle.get("seconds", 0) > 0 and "source" not in oracle
    steps = []
    if trained_here:
        steps.append(("oracle", start if start is not None else oracle_end - oracle["seconds"], oracle_end))
    banks = sorted(work.glob("bank-*/state.json"), key=_mtime)
    features = sorted(work.glob("bank-*/features-*.json"), key=_mtime)
    library_end, experts_end = _mtime(work / "library.json"), _mtime(work / "experts.json")
    t = oracle_end
    for bank in banks:  # the library's bank, then (when the experts read another recipe) theirs
        began = _mtime(bank.parent / "views.npy")
        steps.append((f"logit bank ({json.loads(bank.read_text())['recipe']['views']} views)", max(t, began),
                      _mtime(bank)))
        t = _mtime(bank)
    library = _info(work, "library")
    steps.append((f"library ({library['epochs']} epochs)", library_end - library["seconds"], library_end))
    for f in features:
        steps.append(("library features", library_end, _mtime(f)))
    experts = _info(work, "experts")
    steps.append((f"experts ({experts['epochs']} epochs)", experts_end - experts["seconds"], experts_end))
    steps.append(("pool written", experts_end, _mtime(pool / "manifest.json")))
    return steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--pool", type=Path, required=True)
    ap.add_argument("--start", default=None, help="when poe extract was started (ISO time, UTC)")
    args = ap.parse_args()
    start = dt.datetime.fromisoformat(args.start).replace(tzinfo=dt.UTC).timestamp() if args.start else None
    steps = timeline(args.work, args.pool, start)
    machines = {json.dumps(_info(args.work, p).get("machine", {}), sort_keys=True) for p in ("library", "experts")}
    for m in sorted(machines):
        m = json.loads(m)
        print(f"machine: {m.get('cpu', '?')}, {m.get('cores', '?')} cores, native bf16: {m.get('native_bf16')}")
    first, last = steps[0][1], steps[-1][2]
    for name, began, ended in steps:
        print(f"{name:28s} {(ended - began) / 60:6.1f} min  (ends at {(ended - first) / 60:6.1f})")
    oracle_end = next((e for n, _, e in steps if n == "oracle"), None)
    if oracle_end is not None:
        full = (last - first) / 60
        print(f"full build from nothing: {full:.1f} min (target <= {FULL_TARGET_MIN} on a CPU with AMX)")
    rebuild = (last - (oracle_end if oracle_end is not None else first)) / 60
    print(f"rebuild from the oracle:  {rebuild:.1f} min (target <= {REBUILD_TARGET_MIN})")


if __name__ == "__main__":
    main()
