"""Where a dataset/backbone's stages are, for `make status` and `make report`: the config's ``dirs`` map
resolved for the configured miner and feature (the chain the ARGS name, always listed) and for every other
miner and feature (the chains that ran before). The folder names are decided once, in conf/pipeline.yaml
(``stages.config.chain_dir``); the library takes the resolved folders (:class:`pipeline.layout.Layout`)."""
from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from pipeline.layout import Chain, Layout
from stages.config import MINER_SCHEMAS


def _chain(cfg: DictConfig, miner: str, feature: str) -> Chain:
    c = cfg.copy()
    OmegaConf.update(c, "miner.name", miner, force_add=True)
    OmegaConf.update(c, "backbone.feature", feature, force_add=True)
    return Chain.from_dirs(OmegaConf.to_container(c.dirs, resolve=True),
                           {"miner": miner, "backbone.feature": feature})


def layout_of(cfg: DictConfig) -> Layout:
    """Every chain of ``cfg``'s base dir, the configured one first."""
    from pipeline.backbones.backbone import FEATURES

    mine, feature = str(cfg.miner.name), str(cfg.backbone.feature)
    chains = [_chain(cfg, mine, feature)]
    others = [_chain(cfg, m, f) for m in MINER_SCHEMAS for f in FEATURES if (m, f) != (mine, feature)]
    return Layout(Path(str(cfg.base_dir)), chains + sorted(others, key=lambda c: str(c.dirs["mine"])))
