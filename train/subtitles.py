"""Which text a prompt's subtitle sentence gets: the dataset's own, the ASR transcript, or the first of them.

A dataset's subtitles are kept; the store's ASR text set (`emollama extract --asr`, `store.text`) fills
in where a clip has none, or replaces them when asked (`data.subtitles`):

- ``dataset``           the dataset's subtitle only (a clip without one has no subtitle sentence);
- ``asr``               the ASR text only (the dataset's is ignored);
- ``dataset-then-asr``  the dataset's, else the ASR text (the default).

An empty text (nothing said, or a clip without sound) counts as none. Training (``subtitled_corpus``:
the corpus's clips with their chosen subtitle, before ``train.data`` encodes any prompt), eval and infer
(``pipeline.subtitles``) all choose with ``choose``, so a clip gets the same sentence in each.

Which text set: ``data.asr_set`` (a set name or key), else the store's one text set; with several, the
run asks for one by name. The choice a run made is written to ``<run>/subtitles.json``
(``SubtitleReport``), so eval and infer read the same set.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from typing import Any, Mapping, Sequence

from emollama.corpora import Clip, Corpus
from emollama.store import FeatureStore
from emollama.store import text as text_rows

from .config import SUBTITLE_SOURCES, TrainSetupError

log = logging.getLogger(__name__)

SOURCES = SUBTITLE_SOURCES
DEFAULT_SOURCE = "dataset-then-asr"
REPORT_FILE = "subtitles.json"
TINY_ASR_NOTE = "tiny: a random Whisper test fixture; its text is meaningless, not a transcript"


def _said(text: str | None) -> bool:
    return bool(text and text.strip())


def choose(dataset: str | None, asr: str | None, source: str = DEFAULT_SOURCE) -> tuple[str | None, str | None]:
    """(the subtitle, where it came from: "dataset" | "asr" | None) under ``source``."""
    if source not in SOURCES:
        raise ValueError(f"subtitles = {source!r}: choose one of {', '.join(SOURCES)}")
    if source != "asr" and _said(dataset):
        return dataset, "dataset"
    if source != "dataset" and _said(asr):
        return asr, "asr"
    return None, None


@dataclass
class SubtitleReport:
    """What a set of clips got: the source setting, the text set read, and how many subtitles came from where."""

    source: str
    asr_set: str | None = None          # the text set's key (None: none read)
    asr_name: str | None = None
    counts: dict[str, int] = field(default_factory=lambda: {"dataset": 0, "asr": 0, "none": 0})
    tiny: bool = False                  # the text set was made by the tiny profile's random Whisper

    def use(self, store: FeatureStore, key: str) -> None:
        """Read the text set ``key`` of ``store``."""
        self.asr_set, self.asr_name = key, store.spec(key).name
        self.tiny = store.profiles([key]).get(key) == "tiny"

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, "asr_set": self.asr_set, "asr_name": self.asr_name, "counts": dict(self.counts),
                "note": TINY_ASR_NOTE if self.tiny else None}

    def line(self) -> str:
        c = self.counts
        where = f" ({self.asr_set})" if self.asr_set else ""
        return (f"subtitles ({self.source}): {c['dataset']} from the dataset, {c['asr']} from speech{where}, "
                f"{c['none']} without" + (f"  ({TINY_ASR_NOTE})" if self.tiny and c["asr"] else ""))


def find_text_set(stores: Sequence[FeatureStore | None], wanted: str = "") -> str | None:
    """The key of the ASR text set to read: ``wanted`` (a name or key) in the first store that has it, else
    the one text set the stores hold; None when they hold none. Several (and none wanted): ValueError."""
    stores = [s for s in stores if s is not None]
    if wanted:
        for st in stores:
            try:
                key = st.resolve(wanted)
            except KeyError:
                continue
            if not text_rows.is_text(st.spec(key)):
                raise ValueError(f"{wanted} in {st.url} is a feature set, not a text set (ASR transcripts)")
            return key
        return None
    found: dict[str, str] = {}
    for st in stores:
        for key, spec in text_rows.text_sets(st).items():
            found.setdefault(key, spec.name)
    if len(found) > 1:
        raise ValueError("the store holds several ASR text sets (" + ", ".join(sorted(found)) + "): choose one with "
                         "data.asr_set = KEY (eval/infer: the run's choice, or --asr-set KEY)")
    return next(iter(found), None)


def read_asr(stores: Sequence[FeatureStore | None], key: str | None, clip_ids: Sequence[str]) -> dict[str, dict]:
    """{clip id: its text object} from the first store where the clip is complete in ``key``."""
    out: dict[str, dict] = {}
    if key is None:
        return out
    for st in stores:
        if st is None or key not in st.sets():
            continue
        todo = [c for c in clip_ids if c not in out]
        out.update(text_rows.read_texts(st, key, todo))
    return out


def apply_subtitles(clips: Sequence[Clip], texts: Mapping[str, Mapping[str, Any]], source: str,
                    report: SubtitleReport | None = None) -> tuple[list[Clip], SubtitleReport]:
    """The clips with their chosen subtitle; each clip's ``meta`` says where it came from
    (``subtitle_from``), and holds the ASR text and language read for it (``asr_text``, ``asr_language``)."""
    report = report or SubtitleReport(source)
    out = []
    for c in clips:
        asr = texts.get(c.id)
        chosen, origin = choose(c.subtitle, asr.get("text") if asr else None, source)
        report.counts[origin or "none"] += 1
        meta = {**c.meta, "subtitle_from": origin}
        if asr is not None:
            meta.update(asr_text=asr.get("text"), asr_language=asr.get("language"))
        out.append(replace(c, subtitle=chosen, meta=meta))
    return out, report


def subtitled_corpus(corpus: Corpus, store: FeatureStore, source: str = DEFAULT_SOURCE,
                     asr_set: str = "") -> tuple[Corpus, SubtitleReport]:
    """Training's corpus with each clip's subtitle chosen (``data.subtitles``, ``data.asr_set``) from its own
    and the store's ASR text set. TrainSetupError when the setting cannot be met (no text set for ``asr``)."""
    report = SubtitleReport(source)
    if source == "dataset":
        clips, report = apply_subtitles(corpus.clips, {}, source, report)
        return replace(corpus, clips=clips), report
    try:
        key = find_text_set([store], asr_set)
    except ValueError as e:
        raise TrainSetupError(str(e)) from None
    if key is None and (source == "asr" or asr_set):
        what = f"no text set {asr_set!r}" if asr_set else "no ASR text set"
        raise TrainSetupError(f"data.subtitles = {source!r}, but the store {store.url} has {what}: extract it with "
                              "`emollama extract --asr` (the same --dataset, --data and --store), or set "
                              "data.subtitles = \"dataset\"")
    if key is not None:
        report.use(store, key)
    texts = read_asr([store], key, [c.id for c in corpus.clips])
    clips, report = apply_subtitles(corpus.clips, texts, source, report)
    return replace(corpus, clips=clips), report
