"""Corpora: the datasets emollama reads (MERR, MER2023, DFEW, EMER, plain folders). The bottom of the
house: it imports no other emollama part.

Each dataset is one module defining an `Adapter`: its name, labels, splits (and folds), whether its
clips have sound, its options (a frozen dataclass) and its reader. The built-in adapters are
registered below, in this order; `register(adapter)` adds another, and `load_corpus(name, root,
**options)` reads any registered one. `emollama datasets` shows them.
"""

from .adapter import ADAPTERS, Adapter, Registry, Sound, describe, get_adapter, load_corpus, parse_options, register
from .base import (FRAME_EXTENSIONS, LABEL_ALIASES, VIDEO_EXTENSIONS, Clip, Corpus, DatasetError, check_dir,
                   clip_has_sound, clip_id_for, csv_header, find_source, id_to_path, normalize_label, path_to_id,
                   read_csv, read_text, read_transcripts, safe_id, source_has_sound, unusable_entry)
from .dfew import DFEW, DFEW_FOLDS, DFEW_LABELS, DfewOptions, load_dfew
from .emer import EMER, EmerOptions, EmerSet, load_emer, read_emer
from .folder import FOLDER, FolderOptions, load_folder
from .mer2023 import MER2023, MER2023_LABELS, Mer2023Options, load_mer2023
from .merr import MERR, MERR_LABELS, MerrOptions, load_merr
from .ncev import NcevEntry, read_ncev

# The built-in datasets. A new one: its own module (an Adapter), then one entry here.
register(MERR, MER2023, DFEW, FOLDER, EMER)

__all__ = [
    "ADAPTERS", "Adapter", "Registry", "Sound", "describe", "get_adapter", "load_corpus", "parse_options", "register",
    "Clip", "Corpus", "DatasetError", "clip_has_sound", "source_has_sound",
    "safe_id", "path_to_id", "id_to_path", "clip_id_for", "find_source", "unusable_entry", "check_dir",
    "read_text", "read_csv", "csv_header", "read_transcripts", "normalize_label", "NcevEntry", "read_ncev",
    "VIDEO_EXTENSIONS", "FRAME_EXTENSIONS", "LABEL_ALIASES",
    "MERR", "MERR_LABELS", "MerrOptions", "load_merr",
    "MER2023", "MER2023_LABELS", "Mer2023Options", "load_mer2023",
    "DFEW", "DFEW_LABELS", "DFEW_FOLDS", "DfewOptions", "load_dfew",
    "FOLDER", "FolderOptions", "load_folder",
    "EMER", "EmerOptions", "EmerSet", "load_emer", "read_emer",
]
