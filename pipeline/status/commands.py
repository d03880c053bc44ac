"""What to run: the command that brings a stage up to date, and the lines `make status` prints.

:func:`next_command` turns a state into the stage's make target, ``FORCE=1`` when the stage has finished
results to replace, the keys that pick the stage's own run (its miner, cluster K...) and the experiment's
ARGS."""
from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from pipeline.summaries import format_rounds, rounds_table

if TYPE_CHECKING:
    from pipeline.status.states import StageState

# values the config has when a key is not given: a selector equal to its default is left out of a command
SELECTOR_DEFAULTS = {"miner": "lost", "backbone.feature": "k", "cluster.source": "lost",
                     "dataset.image_set": "trainval"}
# keys of the experiment's ARGS that a suggested command must not carry over
NOT_CARRIED = ("force", "stage_dir", "train_cag.resume", "train_cad.resume", "train_cag.stop_after",
               "train_cad.stop_after", "self_train.resume", "self_train.stop_after")


def _key(arg: str) -> str:
    return arg.split("=", 1)[0].lstrip("+~")


def _carried(arg: str) -> bool:
    """Whether an override of the experiment goes into a suggested command (not a flag such as ``-m``, not
    Hydra's own keys, not :data:`NOT_CARRIED`)."""
    key = _key(arg)
    return "=" in arg and not arg.startswith("-") and key not in NOT_CARRIED and \
        re.split(r"[./]", key)[0] != "hydra"


def default_args(root: Path) -> list[str]:
    """ARGS that find the experiment at ``root`` (= output_root/dataset/backbone) when the experiment's own
    ARGS are not known."""
    return [f"dataset={root.parent.name}", f"backbone={root.name}", f"paths.output_root={root.parent.parent}"]


def next_command(st: "StageState", args: Sequence[str] | None) -> str | None:
    """The command that brings a stage up to date (None when it is done): its make target, ``FORCE=1`` when
    it has finished results to replace, and ARGS = the experiment's ``args`` (the overrides it runs with;
    ``force``, ``stage_dir``, resume/stop keys and Hydra's own left out; None: :func:`default_args`) with
    the keys that pick this stage's run (``st.selectors``: they replace the same keys of ``args``, and are
    added when they differ from the config's default) and what the run needs (``train_cag.resume=true``)."""
    if st.state == "done":
        return None
    if args is None:
        args = default_args(st.root) if st.root is not None else []
    out = [a for a in args if _carried(a)]
    for extra in [f"{k}={v}" for k, v in st.selectors.items()] + list(st.extra_args):
        k, v = extra.split("=", 1)
        at = [i for i, a in enumerate(out) if _key(a) == k]
        if at:
            out[at[0]] = extra
        elif extra in st.extra_args or SELECTOR_DEFAULTS.get(k) != v:
            out.append(extra)
    force = " FORCE=1" if st.force and st.state != "missing" else ""
    quoted = " ".join(shlex.quote(a) for a in out)
    return f"make {st.target}{force}" + (f' ARGS="{quoted}"' if quoted else "")


def format_status(states: list["StageState"], args: Sequence[str] | None = None) -> str:
    """One line per stage (``<stage> <label> <dir>  <finished / why / how it goes on>``), and under every stage
    that is not done the command that brings it up to date (:func:`next_command` with ``args``)."""
    lines, width = [], max([16, *(len(st.stage) for st in states)])
    for st in states:
        extra = ""
        if st.state == "done" and st.end_time and st.wall_time_s is not None:
            extra = f"  finished {st.end_time[:19]}Z in {st.wall_time_s:.0f} s"
        if st.detail:
            extra = f"  {st.detail}"
        if st.changed:
            extra = "  changed: " + ", ".join(st.changed)
        lines.append(f"{st.stage:<{width}} {st.label:<16} {st.path}{extra}")
        command = next_command(st, args)
        if command:
            lines.append(f"{'':<{width + 1}}run: {command}")
    for st in states:  # the self-training rounds of a detector, scored side by side
        rows = rounds_table(st.path) if st.kind == "cag" and st.stage.count("/") == 0 else []
        if len(rows) > 1:
            lines += [f"\nself-training rounds of {st.stage}:", format_rounds(rows)]
    return "\n".join(lines)
