"""The adapter registry: declarations, options, sound, EMER, and a dataset added from outside."""

from dataclasses import dataclass
from pathlib import Path

import pytest
from typer.testing import CliRunner

from emollama.corpora import (ADAPTERS, DFEW, Adapter, Clip, Corpus, DatasetError, Sound, clip_has_sound, load_corpus,
                              parse_options, read_emer, register)


def touch(path: Path, data: bytes = b"\x00") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def test_registry_declares_labels_splits_folds_and_sound_for_every_adapter():
    assert list(ADAPTERS) == ["merr", "mer2023", "dfew", "folder", "emer"]
    for name, a in ADAPTERS.items():
        assert a.name == name and isinstance(a.labels, tuple) and a.splits and isinstance(a.sound, Sound)
        assert a.make_options({}) == a.options()          # every option has a default
    assert ADAPTERS["mer2023"].labels == ("neutral", "angry", "happy", "sad", "worried", "surprise")
    assert len(ADAPTERS["merr"].labels) == 9 and ADAPTERS["emer"].labels == ()
    assert ADAPTERS["dfew"].folds == (1, 2, 3, 4, 5) and ADAPTERS.with_folds() == ("dfew",)
    assert ADAPTERS["dfew"].sound is Sound.NEVER and ADAPTERS["folder"].sound is Sound.ALWAYS
    assert ADAPTERS["merr"].sound is Sound.PER_CLIP and ADAPTERS["emer"].splits == ("emer",)
    assert ADAPTERS.benchmarks() == ("merr", "mer2023", "dfew", "emer")
    assert {n for n, a in ADAPTERS.items() if a.fixed_labels} == {"mer2023", "dfew"}


def test_clips_carry_their_adapters_sound_declaration(tmp_path):
    touch(tmp_path / "m" / "video" / "a.mp4")
    touch(tmp_path / "m" / "video" / "b" / "0001.jpg")            # MERR may hold a frame folder: no sound
    (tmp_path / "m" / "MERR_coarse_grained.txt").write_text("a 10 happy 0\nb 10 sad 0\n")
    merr = {c.id: c.has_sound for c in load_corpus("merr", tmp_path / "m").clips}
    assert merr == {"a": True, "b": False}
    touch(tmp_path / "d" / "Clip" / "clip_224x224" / "00001" / "00001_00001.jpg")
    for split, rows in (("train", b"1,1\n"), ("test", b"")):
        touch(tmp_path / "d" / "EmoLabel_DataSplit" / f"{split}(single-labeled)" / "set_1.csv",
              b"video_name,label\n" + rows)
    assert [c.has_sound for c in load_corpus("dfew", tmp_path / "d").clips] == [False]
    touch(tmp_path / "f" / "x.mp4")
    assert [c.has_sound for c in load_corpus("folder", tmp_path / "f").clips] == [True]
    # a clip made outside an adapter (inference on any path): its source decides
    assert clip_has_sound(Clip("v", tmp_path / "f" / "x.mp4")) and not clip_has_sound(Clip("d", tmp_path / "d"))


def test_options_are_typed_and_named_from_strings_or_config_values(tmp_path):
    assert DFEW.make_options({"fold": "3"}).fold == 3 and DFEW.make_options({"fold": 4}).fold == 4
    assert ADAPTERS["mer2023"].make_options({"lists": '{"train": "a.txt"}', "labels": "happy, sad"}).labels == \
        ("happy", "sad")
    assert ADAPTERS["folder"].make_options({"labels_csv": tmp_path / "l.csv"}).labels_csv == str(tmp_path / "l.csv")
    with pytest.raises(DatasetError, match="dataset 'merr' has no option 'fold'; its options: video_dir"):
        load_corpus("merr", tmp_path, fold=2)
    with pytest.raises(DatasetError, match=r"option fold='two': expected a whole number"):
        DFEW.make_options({"fold": "two"})
    assert parse_options(["fold=2", "frames-dir=Clip/x"], labels_csv=None) == {"fold": "2", "frames_dir": "Clip/x"}
    with pytest.raises(DatasetError, match="expected KEY=VALUE"):
        parse_options(["fold"])
    with pytest.raises(DatasetError, match="given both"):
        parse_options(["fold=2"], fold=3)


def test_emer_rows_references_and_absent_videos(tmp_path):
    touch(tmp_path / "video" / "s1.mp4")
    touch(tmp_path / "video" / "s3" / "0001.jpg")
    (tmp_path / "emer.csv").write_text("name,chinese,english\ns1,x,She smiles: happy.\ns2,y,He frowns.\n"
                                       "s3,z,Calm face.\ns4,w,\n")
    (tmp_path / "transcription_en_all.csv").write_text("name,sentence\ns1,Hello there\n")
    emer = read_emer(tmp_path)            # the folder or the CSV itself
    assert [c.id for c in emer.clips] == ["s1", "s2", "s3"] and emer.absent == ["s2"]
    assert emer.references() == {"s1": "She smiles: happy.", "s2": "He frowns.", "s3": "Calm face."}
    assert emer.clips[0].subtitle == "Hello there" and {c.split for c in emer.clips} == {"emer"}
    assert [c.has_sound for c in emer.clips] == [True, True, False]
    assert [c.id for c in read_emer(tmp_path / "emer.csv").clips] == ["s1", "s2", "s3"]
    corpus = load_corpus("emer", tmp_path / "emer.csv", limit="2")
    assert [c.id for c in corpus.clips] == ["s1"] and "no video" in dict(corpus.rejected)["s2"]
    with pytest.raises(DatasetError, match="no EMER CSV"):
        read_emer(tmp_path / "video")


@dataclass(frozen=True)
class ListOptions:
    list_file: str = "clips.txt"
    repeat: int = 1


def read_list(root: Path, o: ListOptions) -> Corpus:
    names = [n for n in (root / o.list_file).read_text().split() if n] * o.repeat
    clips = [Clip(f"{n}-{i}", root / f"{n}.mp4", label="happy", has_sound=True) for i, n in enumerate(names)]
    return Corpus("listed", root, ("happy",), clips)


def test_a_dataset_registered_here_is_loaded_by_name_and_shown_by_the_cli(tmp_path):
    from emollama.pipeline.cli import app

    listed = Adapter(name="listed", read=read_list, options=ListOptions, labels=("happy",), splits=("train",),
                     sound=Sound.ALWAYS, summary="names in a text file")
    (tmp_path / "mine.txt").write_text("a b\n")
    register(listed)
    try:
        corpus = load_corpus("listed", tmp_path, list_file="mine.txt", repeat="2")
        assert [c.id for c in corpus.clips] == ["a-0", "b-1", "a-2", "b-3"]
        out = CliRunner().invoke(app, ["datasets"])
        assert out.exit_code == 0 and "listed: names in a text file" in out.output
        assert "options: list_file='clips.txt', repeat=1" in out.output and "folds: 1, 2, 3, 4, 5" in out.output
        with pytest.raises(ValueError, match="already registered"):
            register(listed)
    finally:
        ADAPTERS.remove("listed")
    with pytest.raises(DatasetError, match="unknown dataset 'listed'"):
        load_corpus("listed", tmp_path)


def test_extract_forwards_options_generically_and_refuses_unknown_ones(tmp_path):
    from emollama.pipeline.cli import app

    touch(tmp_path / "x.mp4")
    out = CliRunner().invoke(app, ["extract", "--dataset", "folder", "--data", str(tmp_path), "--store",
                                   str(tmp_path / "s.zarr"), "--profile", "tiny", "--option", "fold=2"])
    assert out.exit_code == 2 and "dataset 'folder' has no option 'fold'" in out.output
    out = CliRunner().invoke(app, ["extract", "--dataset", "folder", "--data", str(tmp_path), "--store",
                                   str(tmp_path / "s.zarr"), "--profile", "tiny", "--option", "fold"])
    assert out.exit_code == 2 and "expected KEY=VALUE" in out.output
