"""Dataset adapters on small fixtures written in the real formats."""

import json
import os
from pathlib import Path

import pytest

from emollama.corpora import DatasetError, id_to_path, load_corpus, load_dfew, load_folder, load_merr, path_to_id


def touch(path: Path, data: bytes = b"\x00") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def test_merr_lists_captions_transcripts_and_split(tmp_path):
    for n in ("sample_00000001", "sample_00000002", "sample_00000003", "sample_00000004"):
        touch(tmp_path / "video" / f"{n}.mp4")
    (tmp_path / "MERR_coarse_grained.txt").write_text(
        "sample_00000001 35 angry -1.174107\nsample_00000002 40 happy 0.8\n"
        "sample_00000003 12 bored 0.1\nsample_00000005 12 sad -0.5\n../etc/passwd 3 sad 0\n")
    (tmp_path / "MERR_fine_grained.txt").write_text("sample_00000004 20 doubt -10\nsample_00000001 35 angry -1.174107\n")
    (tmp_path / "MERR_coarse_grained.json").write_text(json.dumps({
        "sample_00000001": {"caption": "A frowning man shouts.", "AU_list": ["AU04"], "peak_index": 3},
        "sample_00000002": {"caption": "She smiles."}}))
    (tmp_path / "MERR_fine_grained.json").write_text(json.dumps({
        "sample_00000001": {"smp_reason_caption": "Frown and raised voice: angry."}}))
    (tmp_path / "transcription_en_all.csv").write_text(
        'name,sentence\nsample_00000001,"No, stop it, now!"\nsample_00000002,\n')
    (tmp_path / "split.csv").write_text("name,split\nsample_00000001,train\nsample_00000002,test\n"
                                        "sample_00000004,train\n")

    corpus = load_merr(tmp_path)
    by_id = {c.id: c for c in corpus.clips}
    assert sorted(by_id) == ["sample_00000001", "sample_00000002", "sample_00000004"]
    a = by_id["sample_00000001"]
    assert (a.label, a.valence, a.subtitle, a.split) == ("angry", -1.174107, "No, stop it, now!", "train")
    assert a.texts == {"reason": "A frowning man shouts.", "reason_v2": "Frown and raised voice: angry."}
    assert a.source == tmp_path / "video" / "sample_00000001.mp4"
    assert by_id["sample_00000002"].subtitle is None and by_id["sample_00000002"].split == "test"
    assert by_id["sample_00000004"].valence is None   # -10 is the test-list placeholder
    reasons = dict(corpus.rejected)
    assert "not in the label set" in reasons["sample_00000003"]
    assert "no video" in reasons["sample_00000005"]
    assert "leaves the data folder" in reasons["../etc/passwd"]
    assert corpus.splits() == {"train": 2, "test": 1}


def test_mer2023_splits_and_labels(tmp_path):
    for n in ("a", "b", "c"):
        touch(tmp_path / "video" / f"{n}.avi")
    (tmp_path / "train.txt").write_text("a 10 Happy 1.0\nb 10 worried -0.3\n")
    (tmp_path / "test.txt").write_text("c 10 neutral -10\nb 10 sad -10\n")
    corpus = load_corpus("mer2023", tmp_path)
    assert [(c.id, c.label, c.split) for c in corpus.clips] == [("a", "happy", "train"), ("c", "neutral", "test")]
    assert corpus.labels == ("neutral", "angry", "happy", "sad", "worried", "surprise")
    assert dict(corpus.rejected)["b"] == "listed in two splits: train.txt:2, test.txt:2 (a clip belongs to one)"


def test_dfew_folds_map_numeric_labels(tmp_path):
    for i in (1, 2, 3, 4):
        touch(tmp_path / "Clip" / "clip_224x224" / f"{i:05d}" / f"{i:05d}_00001.jpg")
    split = tmp_path / "EmoLabel_DataSplit"
    (split / "train(single-labeled)").mkdir(parents=True)
    (split / "test(single-labeled)").mkdir(parents=True)
    (split / "train(single-labeled)" / "set_2.csv").write_text("video_name,label\n1,1\n2,6\n9,3\n")
    (split / "test(single-labeled)" / "set_2.csv").write_text("video_name,label\n3,7\n4,0\n")
    corpus = load_dfew(tmp_path, fold=2)
    assert [(c.id, c.label, c.split) for c in corpus.clips] == [
        ("00001", "happy", "train"), ("00002", "disgust", "train"), ("00003", "fear", "test")]
    assert corpus.clips[0].source.is_dir()
    assert len(corpus.labels) == 7 and "disgust" in corpus.labels
    reasons = dict(corpus.rejected)
    assert "no frame folder" in reasons["9"] and "not single-labelled" in reasons["4"]
    with pytest.raises(DatasetError, match="fold must be 1..5"):
        load_dfew(tmp_path, fold=6)
    with pytest.raises(DatasetError, match="split file not found"):
        load_dfew(tmp_path, fold=1)


def test_folder_with_optional_csv_non_utf8_and_odd_names(tmp_path):
    touch(tmp_path / "clip one.mp4")
    touch(tmp_path / "sub" / "clïp2.MOV")
    touch(tmp_path / "notes.txt")
    touch(tmp_path / "dup.mp4")
    touch(tmp_path / "dup.mkv")
    (tmp_path / "labels.csv").write_bytes("name,label,sentence\nclip one,Happiness,Caf\xe9 time\n".encode("cp1252"))
    corpus = load_folder(tmp_path, labels_csv="labels.csv")
    by_id = {c.id: c for c in corpus.clips}
    assert sorted(by_id) == ["clip one", "dup", "sub%2Fclïp2"]   # a store id holds no "/": see path_to_id
    assert by_id["clip one"].label == "happy" and by_id["clip one"].subtitle == "Café time"
    assert by_id["sub%2Fclïp2"].label is None and by_id["sub%2Fclïp2"].meta == {"path": "sub/clïp2"}
    assert "duplicate id" in dict(corpus.rejected)["dup"]
    assert load_folder(tmp_path).labels == ()


def test_folder_ids_from_subfolders_are_unique_reversible_and_labelled(tmp_path):
    for rel in ("a/x.mp4", "b/x.mp4", "a/b/x.mp4", "x.mp4", "100%.mp4", "a%2Fx.mp4"):
        touch(tmp_path / rel)
    (tmp_path / "labels.csv").write_text("name,label,sentence\na/x,happy,one\nb%2Fx,sad,two\nx,angry,three\n"
                                         "100%,neutral,four\n")
    corpus = load_folder(tmp_path, labels_csv="labels.csv")
    ids = sorted(c.id for c in corpus.clips)
    assert ids == sorted(["a%2Fx", "b%2Fx", "a%2Fb%2Fx", "x", "100%25", "a%252Fx"]) and not corpus.rejected
    assert all("/" not in i for i in ids)
    assert sorted(id_to_path(i) for i in ids) == sorted(["a/x", "b/x", "a/b/x", "x", "100%", "a%2Fx"])
    assert all(path_to_id(id_to_path(i)) == i for i in ids)
    labels = {c.id: (c.label, c.subtitle) for c in corpus.clips}
    # the CSV names a clip by its relative path or by its id
    assert labels["a%2Fx"] == ("happy", "one") and labels["b%2Fx"] == ("sad", "two")
    assert labels["x"] == ("angry", "three") and labels["a%2Fb%2Fx"] == (None, None)
    assert labels["100%25"] == ("neutral", "four")


def test_folder_lists_entries_named_like_videos_that_are_not_files(tmp_path):
    touch(tmp_path / "ok.mp4")
    (tmp_path / "dir.mkv").mkdir()
    os.mkfifo(tmp_path / "fifo.mp4")
    (tmp_path / "link.mp4").symlink_to(tmp_path / "missing.mp4")
    (tmp_path / "good link.mp4").symlink_to(tmp_path / "ok.mp4")
    corpus = load_folder(tmp_path)
    assert sorted(c.id for c in corpus.clips) == ["good link", "ok"]
    why = dict(corpus.rejected)
    assert set(why) == {"dir", "fifo", "link"}
    assert "directory" in why["dir"] and "FIFO" in why["fifo"] and "broken symbolic link" in why["link"]


def test_missing_layout_errors_say_what_to_do(tmp_path):
    with pytest.raises(DatasetError, match="MERR video folder not found"):
        load_merr(tmp_path)
    (tmp_path / "video").mkdir()
    with pytest.raises(DatasetError, match="no MERR clip list"):
        load_merr(tmp_path)
    with pytest.raises(DatasetError, match="unknown dataset 'nope'; choose one of: merr, mer2023, dfew, folder"):
        load_corpus("nope", tmp_path)


def test_folder_lists_every_file_it_does_not_take_and_every_folder_it_does_not_search(tmp_path):
    for rel in ("a.mp4", "b.ts", "sub/c.3gp", ".hidden.mp4", ".git/objects/x.mp4", "feats.zarr/c/0/0", "notes.txt",
                "still.png", "odd.bin", "no_ext"):
        touch(tmp_path / rel)
    (tmp_path / "feats.zarr" / "zarr.json").write_text("{}")
    (tmp_path / "linked").symlink_to(tmp_path / "sub")
    labels = tmp_path / "labels.csv"
    labels.write_text("name,label,sentence\na,happy,hi\nb,sad,oh\nb,sad,oh\nsub/c,sad,x\nsub/c,happy,x\ngone,sad,x\n")
    corpus = load_folder(tmp_path, labels_csv=str(labels))          # absolute: still the dataset's own file
    assert sorted(c.id for c in corpus.clips) == [".hidden", "a", "b"]
    why = dict(corpus.rejected)
    assert why == {
        ".git": ".git: a hidden folder (not searched)",
        "feats": "feats.zarr: a Zarr store (not searched)",
        "linked": "linked: a symbolic link to a folder (not followed: link the videos themselves)",
        "notes": "notes.txt: a text file, not a video",
        "still": "still.png: an image, not a video",
        "odd": why["odd"], "no_ext": why["no_ext"],
        "sub%2Fc": "labels.csv gives it rows that differ: lines 5, 6",
        "gone": "labels.csv:7: no video file gone.* in the folder"}
    assert why["odd"].startswith("odd.bin: not a video PyAV can open (")
    assert why["no_ext"].startswith("no_ext: not a video PyAV can open (")
    assert dict(corpus.notes) == {"b": "labels.csv lists it 2 times, the same each time (lines 3, 4); kept once"}
