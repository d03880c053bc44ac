"""Which backbone a stage builds (:class:`BackboneSettings`, the schema of ``conf/backbone/*.yaml``, which hold
only what differs from these defaults); :func:`pipeline.backbones.backbone.build_backbone` takes them."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from pipeline.settings import Settings, choose

INITS = ("pretrained", "random", "auto")


@dataclass
class BackboneSettings(Settings):
    name: str                         # used in output paths
    arch: str                         # one of pipeline.backbones.specs.ARCHS
    # pretrained | random (smoke runs only; stamped into every artifact) | auto (stages: pretrained, else
    # loudly random)
    init: str = "pretrained"
    weights: Optional[str] = None     # explicit .pth path; overrides weights_dir and the download
    seed: int = 0                     # seed of the random init
    feature: str = "k"                # k | q | v | tokens | normed (after the final norm) (ResNet-50: k | tokens)
    # fp32 (exact, default) | bf16 | fp16: autocast on a GPU (opt-in; refused on a CPU without bf16 units)
    precision: str = "fp32"
    force_precision: bool = False     # run bf16 on such a CPU anyway (about 5-12x slower)
    # torch.compile the blocks: each new image shape compiles; keys agree to ~1e-6, not bit-exact
    compile: bool = False

    def rules(self) -> list[tuple[str, bool, str]]:
        from pipeline.backbones.backbone import FEATURES
        from pipeline.backbones.precision import PRECISIONS
        from pipeline.backbones.specs import ARCHS

        return [("arch", self.arch in ARCHS, f"unknown; choose one of {', '.join(sorted(ARCHS))}"),
                ("feature", self.feature in FEATURES, f"unknown; choose one of {', '.join(FEATURES)}"),
                ("init", self.init in INITS, choose(INITS)),
                ("precision", self.precision in PRECISIONS, choose(PRECISIONS))]
