"""Where a dataset/backbone's stages are: the folders of each chain, as the config's ``dirs`` map resolved them.

A *chain* is the folders of one miner and feature: its mine folder and, keyed the same way, the class-
agnostic detector, the cluster runs and the class-aware detector (``mine/``, ``cag/``, ``cluster/``,
``cad/`` for LOST on keys; ``mine_tokencut/``, ``cag_tokencut/``, ... for TokenCut). The library does not
decide these names (the config does, ``stages.config.chain_dir``): the status and report stages resolve
the ``dirs`` map for every miner and feature and pass the chains here. Runs *inside* a chain's folder (the
cluster runs ``<source>/<run_name>``, the evaluations ``eval_<set>``) are found by their manifests.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

# the stages of a chain, in the order of the pipeline; the kind of each folder (and of the runs below it)
KINDS = ("mine", "cag", "cluster", "cad")
# the ``dirs`` key of each kind's folder (``clusters``: the folder that holds every cluster run)
DIRS_KEYS = {"mine": "mine", "cag": "cag", "cluster": "clusters", "cad": "cad"}


@dataclass(frozen=True)
class Chain:
    """The folders of one chain (kind -> folder) and the config keys that select it (``miner``,
    ``backbone.feature``: what a command must say to run this chain and not another)."""

    dirs: Mapping[str, Path]
    selectors: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def from_dirs(cls, dirs: Mapping[str, str | os.PathLike], selectors: Mapping[str, str] | None = None) -> "Chain":
        """From a resolved ``dirs`` map of the config (``mine``, ``cag``, ``clusters``, ``cad``; other keys
        ignored)."""
        return cls({k: Path(dirs[key]) for k, key in DIRS_KEYS.items()}, dict(selectors or {}))


@dataclass(frozen=True)
class Layout:
    """Every chain of one base dir (``output_root/dataset/backbone``). The first chain is the one the
    config names: its folders are always listed (missing or not); the others' only where they exist."""

    root: Path
    chains: Sequence[Chain]

    @classmethod
    def single(cls, root: str | os.PathLike, dirs: Mapping[str, str | os.PathLike] | None = None,
               selectors: Mapping[str, str] | None = None) -> "Layout":
        """One chain: ``dirs`` (a resolved ``dirs`` map), or the kinds' own names under ``root`` (the
        folders of the default chain, LOST on keys, as a caller without a config sees them)."""
        root = Path(root)
        dirs = dirs if dirs is not None else {key: root / kind for kind, key in DIRS_KEYS.items()}
        return cls(root, [Chain.from_dirs(dirs, selectors)])

    def folders(self) -> list[tuple[str, Path, Chain]]:
        """(kind, folder, its chain) of every chain folder to look at, grouped by kind in pipeline order: the
        configured chain's first, then the other chains' that exist; each folder once."""
        out, seen = [], set()
        for kind in KINDS:
            for i, chain in enumerate(self.chains):
                d = chain.dirs[kind]
                key = os.path.abspath(d)
                if key in seen or (i and not d.is_dir()):
                    continue
                seen.add(key)
                out.append((kind, d, chain))
        return out

    def name(self, path: Path) -> str:
        """A folder's name in messages: relative to the base dir (``cluster_tokencut/lost/k20``)."""
        try:
            return Path(path).relative_to(self.root).as_posix()
        except ValueError:
            return str(path)
