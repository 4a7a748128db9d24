"""The models a job needs, checked before it creates anything: no store and no run folder is left
behind by a job whose models are missing, and one message names them all.

- extraction: every encoder of the run (the profile's four views and each `[extract.encoders.*]`
  entry), `run_extract` calls `check_models(encoders=...)` before it opens the store;
- training: the LM (`check_models(llm=cfg)` before the run folder exists);
- eval and infer: `check_run_models(run_config, extract_config)`: the run's LM and, when clips must be
  extracted, the encoders that make its feature sets.

A model is missing when it names a local folder or file that does not exist, or, when models must come
from local files only (offline, or the hub does not answer one quick probe: `extract.sources`), a hub id
that is not in the HF cache. Online with a reachable hub nothing else is checked: the libraries download.
The one error, `MissingModelsError`, is both stage one's `MissingWeightsError` and stage two's
`MissingModelError`, so every command reports it as a usage error (exit status 2).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from emollama.extract.encoders import EncodersConfig, missing_encoders
from emollama.extract.sources import (MissingModel, MissingWeightsError, ModelSource, cached_snapshot,
                                      local_only_reason, missing_models, source_name)
from emollama.train.config import PAPER_LLM, MissingModelError, TrainConfig

if TYPE_CHECKING:
    from emollama.pipeline.config import Config


class MissingModelsError(MissingWeightsError, MissingModelError):
    """Models a job needs are missing: the message lists every one, with one download hint."""


def llm_source(cfg: TrainConfig) -> ModelSource | None:
    """The LM a training config loads (`model.llm`, else the profile's), None for the tiny fixture (built
    here, never downloaded). The same choice as `train.model.llm_source`, without building anything."""
    if not cfg.model.llm and cfg.model.profile == "tiny":
        return None
    return ModelSource(cfg.model.llm or PAPER_LLM, cfg.model.revision)


def missing_llm(cfg: TrainConfig, reason: str | None) -> list[MissingModel]:
    """The LM of `cfg` when it is not here: a folder that does not exist, or (with `reason`: models must
    come from local files) a hub id that is not in the HF cache."""
    source = llm_source(cfg)
    if source is None:
        return []
    role, setting = "the language model", "--llm DIR (model.llm)"
    if source.model.startswith("meta-llama/"):
        role += " (gated: accept its licence on the hub first)"
    try:
        local = source.local_path()
    except (FileNotFoundError, ValueError):
        return [MissingModel(source.model, role, setting, "no such folder")]
    if local is None and reason is not None and cached_snapshot(source.model, source.revision) is None:
        return [MissingModel(source_name(source), role, setting)]
    return []


def check_models(*, encoders: EncodersConfig | None = None, llm: TrainConfig | None = None,
                 offline: bool | None = None) -> bool:
    """Check every model of a job (its `encoders`, the LM of `llm`) before it creates anything: raise one
    MissingModelsError listing all the missing ones. `offline` None: the LM config's `model.offline`,
    else HF_HUB_OFFLINE. The hub is probed once, only when some model is a hub id. Returns True when the
    job must load from local files only (offline, or the hub cannot be reached)."""
    if offline is None and llm is not None:
        offline = llm.model.offline
    llm_src = llm_source(llm) if llm is not None else None
    on_hub = any(e.source.on_hub() for e in encoders or ()) or (llm_src is not None and llm_src.on_hub())
    reason = local_only_reason(offline) if on_hub else None
    missing = (missing_encoders(encoders, reason) if encoders is not None else []) + \
        (missing_llm(llm, reason) if llm is not None else [])
    if missing:
        raise MissingModelsError(str(missing_models(missing, reason)))
    return reason is not None


def check_run_models(run_config: TrainConfig, extract: "Config | None" = None, *,
                     offline: bool | None = None) -> bool:
    """For eval and infer: the run's LM and, when clips must be extracted (`extract`: the stage-one
    config that makes the run's sets, e.g. `pipeline.evaluation.extraction_config`), its encoders; one
    MissingModelsError lists every missing model. Call it before creating any store or report folder.
    Returns True when the job must load from local files only."""
    encoders = None
    if extract is not None:
        from emollama.pipeline.extraction import encoders_config

        encoders = encoders_config(extract)
    return check_models(encoders=encoders, llm=run_config, offline=offline)
