"""The modalities the prompt knows, in one table: their token order and the paper's feature set of each.

Read by ``model`` (the order of the one-token views inside ``<feature>``), ``config`` (the paper's
default feature sets) and ``params`` (the paper's shapes, for counting without a store). A feature set
of another modality (a fifth encoder) is welcome: its one-token views follow the known ones, before
the CLS tokens.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Modality:
    name: str                 # FeatureSpec.modality of the sets it covers
    paper_set: str            # the feature set the paper reads for it
    paper_shape: tuple        # that set's per-clip shape: [D] (one token) or [1 CLS + patches, D]


# In the order of their tokens inside <feature>: local, temporal, audio, then global (its CLS, which comes
# last in any case; its patches fill <video>).
MODALITIES: tuple[Modality, ...] = (
    Modality("local", "local.vit_mae.mean", (1024,)),
    Modality("temporal", "temporal.videomae.mean", (1024,)),
    Modality("audio", "audio.hubert.mean", (1024,)),
    Modality("global", "global.eva.tokens", (1025, 1408)),
)

MODALITY_ORDER: dict[str, int] = {m.name: i for i, m in enumerate(MODALITIES)}


def token_rank(modality: str) -> int:
    """Where a one-token view of ``modality`` goes inside ``<feature>``: known ones by the table, others after."""
    return MODALITY_ORDER.get(modality, len(MODALITIES))


# The paper's feature sets in prompt order: the token set first (its patches fill <video>), then the
# one-token views in <feature> order.
PAPER_FEATURES: list[str] = ([m.paper_set for m in MODALITIES if len(m.paper_shape) == 2]
                             + [m.paper_set for m in MODALITIES if len(m.paper_shape) == 1])
