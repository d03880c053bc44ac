"""The one reader of what a finished stage wrote about itself (``manifest.json``, ``metrics.json``), typed.

`make status` and `make report` read other stages' files only through these classes, so the key names of
a stage's summary are spelled here once, not at every place that shows them. Each reader returns None for
a file that is absent or unreadable (status and report say what exists); the raw JSON stays available as
``raw`` for sections that show a stage's numbers as they are.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

# the mine stage's pictures: ``<index in the dataset, 6 digits>_<image stem>.png`` (:func:`mining_picture_name`)
_MINING_PICTURE = re.compile(r"(\d+)_(.*)\.png$")


def read_json_or_none(path: Path) -> Any:
    """A JSON file, or None when absent or unreadable."""
    try:
        return json.loads(Path(path).read_text()) if Path(path).is_file() else None
    except (OSError, ValueError):
        return None


def _dict(v: Any) -> dict:
    return v if isinstance(v, dict) else {}


@dataclass(frozen=True)
class InputRecord:
    """An input file as the manifest recorded it: its path when the stage ran, its sha256."""
    path: str
    sha256: str | None


@dataclass(frozen=True)
class Manifest:
    """A stage's ``manifest.json`` (written last: a stage with one finished)."""
    config: dict                     # the resolved config (stage_dir, base_dir, paths, dataset, miner, ...)
    inputs: dict[str, InputRecord]
    annotations_digest: str | None
    wall_time_s: float | None
    end_time: str | None
    raw: dict

    @classmethod
    def read(cls, stage_dir: Path) -> "Manifest | None":
        """None without one; :class:`ValueError` when it is there but unreadable."""
        path = Path(stage_dir) / "manifest.json"
        if not path.is_file():
            return None
        try:
            man = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise ValueError(f"{path} unreadable: {e}") from e
        man = _dict(man)
        inputs = {str(k): InputRecord(str(_dict(v).get("path", "")), _dict(v).get("sha256"))
                  for k, v in _dict(man.get("inputs")).items()}
        return cls(_dict(man.get("config")), inputs, man.get("annotations_digest"), man.get("wall_time_s"),
                   man.get("end_time"), man)

    def section(self, name: str) -> dict:
        """One section of the recorded config (``cluster``, ``train_cad``...), {} when not recorded."""
        return _dict(self.config.get(name))


@dataclass(frozen=True)
class MiningPicture:
    path: Path
    index: int | None                # the image's position in the dataset (pseudo_boxes.json ``images``)


@dataclass(frozen=True)
class MiningSummary:
    """A mining run's ``metrics.json`` and its pictures (``viz/``)."""
    stage_dir: Path
    images: int | None
    boxes: int | None
    failures: int
    failed_images: list = field(default_factory=list)   # {image_id, path, error} of each image it failed on
    method: str | None = None
    backbone: str | None = None
    corloc: float | None = None
    corloc_hits: int | None = None
    corloc_total: int | None = None
    multi_box: dict | None = None
    seconds: float | None = None
    raw: dict = field(default_factory=dict)

    @classmethod
    def read(cls, stage_dir: Path) -> "MiningSummary":
        """Its metrics.json (every field None/empty when there is none)."""
        m = _dict(read_json_or_none(Path(stage_dir) / "metrics.json"))
        try:
            failures = int(m.get("failures") or 0)
        except (TypeError, ValueError):
            failures = 0
        return cls(Path(stage_dir), m.get("images"), m.get("boxes"), failures, list(m.get("failed_images") or []),
                   m.get("method"), m.get("backbone"), m.get("corloc"), m.get("corloc_hits"), m.get("corloc_total"),
                   m.get("multi_box") or None, m.get("seconds"), m)

    def failed_ids(self) -> set[str]:
        """Dataset ids of the images the miner failed on."""
        return {str(f["image_id"]) for f in self.failed_images if isinstance(f, dict) and f.get("image_id") is not None}

    def pictures(self) -> list[MiningPicture]:
        """Its pictures in image order, each with the index of the image it shows."""
        out = []
        for p in pngs(self.stage_dir / "viz"):
            m = _MINING_PICTURE.match(p.name)
            out.append(MiningPicture(p, int(m.group(1)) if m else None))
        return out


def journal_counts(stage_dir: Path) -> tuple[int, int] | None:
    """(images with a result, images whose last row is a failure) over a mining run's shard journals
    (``results/shard-I-of-N.jsonl``; the last row of an image wins, as when the journals are merged; a torn
    last line skipped); None without journals: what a mining run stopped before its merge has done."""
    results = stage_dir / "results"
    journals = sorted(results.glob("shard-*.jsonl")) if results.is_dir() else []
    if not journals:
        return None
    last: dict = {}
    for j in journals:
        with open(j) as f:
            for line in f:
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:  # a torn last line: the journal cuts it on reopen
                    continue
                last[row.get("image_id", row.get("index"))] = row.get("error") is None
    ok = sum(last.values())
    return ok, len(last) - ok


def mining_picture_name(index: int, image_id: str) -> str:
    """The name of the mine stage's picture of the image at ``index`` in the dataset (``000003_cat.png``):
    :meth:`MiningSummary.pictures` reads the index back from it."""
    return f"{int(index):06d}_{Path(str(image_id)).stem}.png"


def natural_key(s: str) -> list:
    """Sort key: numbers by value (``cluster_10`` after ``cluster_9``)."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", str(s))]


def pngs(d: Path) -> list[Path]:
    """The PNG pictures of a folder (hidden work files skipped), in natural order."""
    return sorted((p for p in d.glob("*.png") if not p.name.startswith(".")), key=lambda p: natural_key(p.name)) \
        if d.is_dir() else []


# ------------------------------------------------------------------------- self-training rounds
ROUND_DIR = re.compile(r"round(\d+)$")   # a round's folder under the cag folder: round1, round2, ...


def round_dirs(cag: Path) -> list[tuple[int, Path]]:
    """(round, folder) of every self-training round folder below the cag folder ``cag``, in round order."""
    return sorted((int(m.group(1)), d) for d in Path(cag).glob("round*")
                  if d.is_dir() and (m := ROUND_DIR.match(d.name)))


def rounds_table(cag: Path) -> list[dict]:
    """One row per finished round under the cag folder ``cag`` (round 0: the cag folder itself), from their
    metrics.json and pseudo-label files: ``round``, ``folder``, ``corloc``, ``AP50``, ``AP``, ``mask_AP`` (None
    where not scored), ``boxes_used`` (pseudo-objects trained on), ``predictions`` / ``previous`` (how many of them
    are kept detections / previous objects added back), ``score_threshold``, ``random_init``."""
    def read(p: Path) -> dict:
        v = read_json_or_none(p)
        return v if isinstance(v, dict) else {}

    folders = [(0, Path(cag)), *round_dirs(cag)]
    rows = []
    for r, d in folders:
        m = read(d / "metrics.json")
        if not m:
            continue
        ev, st = m.get("eval") or {}, (read(d / "pseudo_labels.json").get("info") or {}).get("self_training") or {}
        rows.append({"round": r, "folder": str(d), "corloc": ev.get("corloc"), "AP50": ev.get("AP50"),
                     "AP": ev.get("AP"), "mask_AP": (ev.get("mask") or {}).get("AP"),
                     "boxes_used": (m.get("dataset_stats") or {}).get("boxes_used"),
                     "predictions": st.get("prediction"), "previous": st.get("previous"),
                     "score_threshold": st.get("score_threshold"), "random_init": bool(m.get("random_init"))})
    return rows


def format_rounds(rows: Sequence[dict]) -> str:
    """The rounds' table as console lines (``make self-train``, ``make status``)."""
    def num(v):
        return "-" if v is None else f"{v:.2f}"

    lines = ["round  CorLoc   AP50     AP  maskAP  objects (predicted + kept)  threshold"]
    for r in rows:
        objects = "" if r["predictions"] is None else f"  ({r['predictions']} + {r['previous']})"
        lines.append(f"{r['round']:>5} {num(r['corloc']):>7} {num(r['AP50']):>6} {num(r['AP']):>6} "
                     f"{num(r['mask_AP']):>7}  {str(r['boxes_used'] or '-') + objects:<26} "
                     f"{'-' if r['score_threshold'] is None else r['score_threshold']}")
    if any(r["random_init"] for r in rows):
        lines.append("[RANDOM WEIGHTS: smoke test, not a result]")
    return "\n".join(lines)
