"""Fault suite, dataset lists (issue 20, item 6): splits are exactly what split.csv says, split names
are read in any case or rejected, entries that disagree are rejected with their lines, and a file that
cannot be parsed is one line naming the file and the row, exit 2, for `extract` and `train` alike.
docs/faults.md tabulates them.

The adapters read text only, so the videos here are empty files: nothing is decoded."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from emollama.corpora import DatasetError, load_corpus, load_folder, load_merr
from emollama.corpora.base import MAX_FIELD

runner = CliRunner()


def merr(root: Path, coarse: str, *, fine: str | None = None, split: str | None = None,
         captions: str | None = None) -> Path:
    """A MERR folder: the lists and files given, and an (empty) video for every name they list."""
    (root / "video").mkdir(parents=True, exist_ok=True)
    (root / "MERR_coarse_grained.txt").write_text(coarse)
    for text, name in ((fine, "MERR_fine_grained.txt"), (split, "split.csv"), (captions, "MERR_coarse_grained.json")):
        if text is not None:
            (root / name).write_text(text)
    for line in coarse.splitlines() + (fine or "").splitlines():
        (root / "video" / f"{line.split()[0]}.mp4").touch()
    return root


def one_error_line(args: list[str]) -> str:
    """Run the CLI; it must exit 2 with one line on stderr (never a traceback); that line."""
    from emollama.pipeline.cli import app

    r = runner.invoke(app, args)
    assert r.exit_code == 2 and isinstance(r.exception, SystemExit), (r.exit_code, r.output, r.exception)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.output, r.output
    return lines[0]


def extract_and_train_fail_alike(data: Path, tmp_path: Path) -> list[str]:
    """The one error line of `extract` and of `train` on `data` (a MERR folder); both exit 2."""
    store = tmp_path / "s.zarr"
    lines = [one_error_line(["extract", "--dataset", "merr", "--data", str(data), "--store", str(store),
                             "--profile", "tiny", "--workers", "0", "--no-progress"]),
             one_error_line(["train", "--dataset", "merr", "--data", str(data), "--store", str(store),
                             "--out", str(tmp_path / "run"), "--profile", "tiny", "--no-progress"])]
    assert not store.exists()
    return lines


# -------------------------------------------------------------------------------- splits


def test_a_clip_split_csv_does_not_name_is_listed_and_never_trained_on(tmp_path):
    # the fault: a test clip missing from split.csv became a train clip
    data = merr(tmp_path / "d", "a 10 happy 0.5\nb 10 sad -0.5\nc 10 angry -0.9\n",
                split="name,split\na,train\nb,test\n")
    corpus = load_merr(data)
    assert {c.id: c.split for c in corpus.clips} == {"a": "train", "b": "test"}
    assert [c.id for c in corpus.split("train")] == ["a"]
    assert dict(corpus.rejected) == {"c": "not named in split.csv (every clip needs its split there)"}
    # a name split.csv gives that no list holds is listed too
    (data / "split.csv").write_text("name,split\na,train\nb,test\nc,test\nzz,train\n")
    corpus = load_merr(data)
    assert sorted(c.id for c in corpus.clips) == ["a", "b", "c"]
    assert dict(corpus.rejected) == {"zz": "named in split.csv but in neither MERR_coarse_grained.txt nor "
                                           "MERR_fine_grained.txt"}
    # without split.csv every clip is train, as documented
    (data / "split.csv").unlink()
    assert load_merr(data).splits() == {"train": 3}


def test_split_names_are_read_in_any_case_or_rejected(tmp_path):
    # the fault: "Test" became a split of its own, beside "test"
    data = merr(tmp_path / "d", "".join(f"{n} 10 happy 0.1\n" for n in "abcdef"),
                split="name,split\na,Test\nb, TEST \nc,train\nd,Validation\ne,tset\nf,\n")
    corpus = load_merr(data)
    assert {c.id: c.split for c in corpus.clips} == {"a": "test", "b": "test", "c": "train", "d": "val"}
    assert corpus.splits() == {"test": 2, "train": 1, "val": 1}
    reasons = dict(corpus.rejected)
    assert reasons == {"e": "split.csv:6: split 'tset' is not one of train, val, test",
                       "f": "split.csv:7: split '' is not one of train, val, test"}
    assert [c.id for c in corpus.split("Test")] == ["a", "b"]          # asking in any case finds them too
    # a folder dataset's labels CSV: the same names, and with a split column its splits are exact too
    folder = tmp_path / "f"
    folder.mkdir()
    for n in ("x", "y", "z", "w"):
        (folder / f"{n}.mp4").touch()
    (folder / "labels.csv").write_text("name,label,sentence,split\nx,happy,hi,Test\ny,sad,oh,bogus\nz,sad,no,\n")
    corpus = load_folder(folder, labels_csv="labels.csv")
    assert [(c.id, c.split) for c in corpus.clips] == [("x", "test")]
    assert dict(corpus.rejected) == {
        "w": "not named in labels.csv, whose split column names the split of every clip",
        "y": "labels.csv:3: split 'bogus' is not one of train, val, test",
        "z": "labels.csv:4: no split given (its split column names the split of every clip)"}


def test_a_clip_with_two_splits_is_rejected_and_an_identical_repeat_is_kept_once(tmp_path):
    data = merr(tmp_path / "d", "a 10 happy 0.5\nb 10 sad -0.5\n", split="name,split\na,train\nb,train\nb,test\na,train\n")
    corpus = load_merr(data)
    assert [(c.id, c.split) for c in corpus.clips] == [("a", "train")]
    assert dict(corpus.rejected) == {"b": "split.csv gives two splits: train (line 3), test (line 4)"}
    assert dict(corpus.notes) == {"a": "split.csv lists it 2 times (lines 2, 5) with split train; kept once"}


# -------------------------------------------------------------------------------- labels


def test_an_id_listed_twice_with_two_labels_is_rejected(tmp_path):
    # the fault: the first label was kept and nothing was rejected
    data = merr(tmp_path / "d", "a 10 happy 0.5\nb 10 sad -0.5\na 10 angry -0.8\nb 10 sad -0.5\n")
    corpus = load_merr(data)
    assert [(c.id, c.label) for c in corpus.clips] == [("b", "sad")]
    assert dict(corpus.rejected) == {
        "a": "conflicting labels: happy (MERR_coarse_grained.txt:1), angry (MERR_coarse_grained.txt:3)"}
    # an identical repeat is kept once, with a note
    assert dict(corpus.notes) == {"b": "listed more than once with the same label (MERR_coarse_grained.txt:2, "
                                       "MERR_coarse_grained.txt:4); kept once"}
    # MER2023: one clip in two split lists is rejected (it was kept in the first); a repeat within one
    # list that disagrees is rejected too
    m = tmp_path / "mer"
    (m / "video").mkdir(parents=True)
    for n in "abc":
        (m / "video" / f"{n}.mp4").touch()
    (m / "train.txt").write_text("a 10 happy 1\nb 10 sad 1\nc 10 sad 1\nc 10 happy 1\n")
    (m / "test.txt").write_text("b 10 sad -10\n")
    corpus = load_corpus("mer2023", m)
    assert [c.id for c in corpus.clips] == ["a"]
    assert dict(corpus.rejected) == {"b": "listed in two splits: train.txt:2, test.txt:1 (a clip belongs to one)",
                                     "c": "conflicting labels: sad (train.txt:3), happy (train.txt:4)"}


def test_a_coarse_fine_label_conflict_is_rejected(tmp_path):
    # the fault: the coarse label won without a word
    data = merr(tmp_path / "d", "a 10 happy 0.5\nb 10 sad -0.5\nc 10 worried -0.2\n",
                fine="a 10 Happiness 0.5\nb 10 angry -0.5\nc 10 worried -0.7\n")
    corpus = load_merr(data)
    assert [(c.id, c.label) for c in corpus.clips] == [("a", "happy")]   # "Happiness" is happy: they agree
    assert dict(corpus.rejected) == {
        "b": "conflicting labels: sad (MERR_coarse_grained.txt:2), angry (MERR_fine_grained.txt:2)",
        "c": "conflicting valences: -0.2 (MERR_coarse_grained.txt:3), -0.7 (MERR_fine_grained.txt:3)"}
    assert corpus.notes == []                     # a clip in both lists is the rule, not a note


# -------------------------------------------------------------------------------- unparsable files


def test_a_split_csv_with_the_header_name_set_is_one_line_for_extract_and_train(tmp_path):
    # the fault: a KeyError traceback
    data = merr(tmp_path / "d", "a 10 happy 0.5\nb 10 sad -0.5\n", split="name,set\na,train\nb,test\n")
    expected = (f"error: {data / 'split.csv'}:1: the header is name,set; expected the columns name,split "
                "(missing split)")
    assert extract_and_train_fail_alike(data, tmp_path) == [expected, expected]


def test_a_malformed_caption_json_is_one_line_for_extract_and_train(tmp_path):
    # the fault: a JSONDecodeError traceback
    data = merr(tmp_path / "d", "a 10 happy 0.5\n", captions='{"a": {"caption": "She smiles."},\n "b": {"caption"\n')
    path = data / "MERR_coarse_grained.json"
    expected = f"error: {path}: not valid JSON at line 3, column 1: Expecting ':' delimiter"
    assert extract_and_train_fail_alike(data, tmp_path) == [expected, expected]
    # JSON of the wrong shape names the entry
    path.write_text(json.dumps({"a": {"caption": ["a", "list"]}}))
    with pytest.raises(DatasetError, match=r"MERR_coarse_grained.json: entry 'a': expected an object whose "
                                           r"'caption' is a text, found list"):
        load_merr(data)


def test_a_malformed_list_or_csv_row_is_one_line_naming_the_file_and_the_row(tmp_path):
    data = merr(tmp_path / "d", "a 10 happy 0.5\nb 10 sad -0.5\n")
    (data / "MERR_fine_grained.txt").write_text("a 10 happy 0.5\nb ten sad -0.5\nc 1 2 3 4\n")
    line = extract_and_train_fail_alike(data, tmp_path)[0]
    assert line == (f"error: {data / 'MERR_fine_grained.txt'}:2: not 'name frame_count emotion valence': "
                    "'b ten sad -0.5' (and 1 more such lines)")
    (data / "MERR_fine_grained.txt").unlink()
    (data / "transcription_en_all.csv").write_text('name,sentence\na,"hi, there"\nb,hi, there\n')
    with pytest.raises(DatasetError, match=r"transcription_en_all.csv:3: 3 fields, but the header has 2 "
                                           r"\(name,sentence\); quote values that hold a comma"):
        load_merr(data)
    (data / "transcription_en_all.csv").write_text(f"name,sentence\na,{'long ' * 40_000}\nb,{'x' * (MAX_FIELD + 1)}\n")
    with pytest.raises(DatasetError, match=r"transcription_en_all.csv:3: not readable as CSV \(field larger than"):
        load_merr(data)
