"""Hybrid weights' int8 / dense switch points, kept on disk per machine.

Measuring where the int8 kernel stops beating the dense GEMM takes ~3 s of a ~5 s load (SmolLM2-135M,
2-core EPYC), and where the two are at parity for a size (down_proj at 128 rows there) it comes out
either way from one load to the next: a restarted server then prefilled some chunks with other
numerics than before, and greedy output could change at a near-tie. So the first measurement of a
shape is kept in a JSON file beside the native kernels' build (one per Python environment, torch
version and CPU), keyed by everything that moves it (`kernels.machine_identity`, the projection's
shape and copies, dtype, device); later loads read it. SPECACHE_RECALIBRATE=1 measures again and
overwrites; SPECACHE_SWITCH_POINTS names another file. A corrupt or unwritable file is measured
over (with a warning), never an error.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from pathlib import Path

from specache import kernels

log = logging.getLogger(__name__)

PATH_ENV = "SPECACHE_SWITCH_POINTS"
RECALIBRATE_ENV = "SPECACHE_RECALIBRATE"
FILE_NAME = "hybrid-switch-points.json"


def path() -> Path:
    return Path(os.environ.get(PATH_ENV) or kernels.machine_dir() / FILE_NAME)


def key(shape: tuple[int, ...], copies: int, dtype, device) -> str:
    return f"{kernels.machine_identity()} | {'x'.join(map(str, shape))} x{copies} {dtype} {device}"


def recalibrate_requested() -> bool:
    return os.environ.get(RECALIBRATE_ENV, "") not in ("", "0")


def _read(file: Path) -> dict[str, int]:
    try:
        stored = json.loads(file.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        log.warning("hybrid switch points: cannot read %s (%s); measuring again", file, e)
        return {}
    if not isinstance(stored, dict) or not all(isinstance(k, str) and type(v) is int and v >= 0
                                               for k, v in stored.items()):
        log.warning("hybrid switch points: %s is not a {key: rows} table; measuring again", file)
        return {}
    return stored


def get(entry: str) -> int | None:
    """The stored switch point, or None (not measured here yet, or a re-measurement was asked for)."""
    return None if recalibrate_requested() else _read(path()).get(entry)


def put(entry: str, rows: int) -> None:
    """Store one switch point, keeping the file's others (written to a temporary file and renamed
    over the old one, so a reader never sees half a file)."""
    file = path()
    table = _read(file)
    table[entry] = rows
    tmp = file.with_name(f"{file.name}.{os.getpid()}.tmp")
    try:
        file.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(table, indent=1, sort_keys=True))
        os.replace(tmp, file)
    except OSError as e:
        log.warning("hybrid switch points: cannot write %s (%s); they will be measured at every load", file, e)
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
