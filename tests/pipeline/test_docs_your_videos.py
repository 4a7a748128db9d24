"""docs/your-videos.md, run as written: its tiny-profile commands on a folder of real clips (with a labels
CSV and a subtitles CSV), its Python snippet, and its paper-profile commands, which without the paper's
models must stop with one clear message each (exit 2, no traceback) and leave no store behind."""

from __future__ import annotations

import csv
import re
import shlex
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from emollama.pipeline.cli import app

PAGE = Path(__file__).resolve().parents[2] / "docs" / "your-videos.md"
runner = CliRunner()
pytestmark = [pytest.mark.slow, pytest.mark.samples]


def block(tag: str, lang: str = "bash") -> str:
    """The code block after the `<!-- tested: TAG -->` marker."""
    text = PAGE.read_text()
    m = re.search(rf"<!-- tested: {tag} -->\s*```{lang}\n(.*?)```", text, re.S)
    assert m, f"no block tagged {tag} in {PAGE}"
    return m.group(1)


def commands(tag: str) -> list[list[str]]:
    out = []
    for line in block(tag).splitlines():
        line = line.split("  #")[0].strip()
        if line:
            words = shlex.split(line)
            assert words[0] == "emollama", line
            out.append(words[1:])
    return out


@pytest.fixture()
def my_videos(tmp_path, samples_dir, monkeypatch):
    """The page's folder: real clips (one in a subfolder), labels.csv with a split, subtitles.csv."""
    vids = tmp_path / "my_videos"
    (vids / "street").mkdir(parents=True)
    names = ["sample_00000338", "sample_00003462", "sample_00000669", "sample_00001073"]
    rel = {n: (f"street/{n}" if i == 3 else n) for i, n in enumerate(names)}
    for n, r in rel.items():
        shutil.copyfile(samples_dir / f"{n}.mp4", vids / f"{r}.mp4")
    labels = {"sample_00000338": ("sad", "train"), "sample_00003462": ("angry", "train"),
              "sample_00000669": ("angry", "test"), "sample_00001073": ("sad", "test")}
    with open(vids / "labels.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["name", "label", "split"])
        w.writerows([rel[n], lab, split] for n, (lab, split) in labels.items())
    subs = {r["name"]: r["sentence"] for r in csv.DictReader(open(samples_dir / "transcription_en.csv"))}
    with open(vids / "subtitles.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["name", "sentence"])
        w.writerows([n, subs[n]] for n in names)
    monkeypatch.chdir(tmp_path)
    return vids


def test_the_tiny_commands_run_as_written(my_videos, tmp_path):
    for args in commands("tiny"):
        res = runner.invoke(app, args)
        assert res.exit_code == 0, f"emollama {' '.join(args)}\n{res.output}"
    assert (tmp_path / "runs/mine/eval/folder/report.md").is_file()
    rows = list(csv.DictReader(open(tmp_path / "results.csv")))
    assert len(rows) == 4 and all(r["label"] in ("angry", "sad") for r in rows)
    assert {r["subtitle"] for r in rows if r["id"] == "street%2Fsample_00001073"} == \
        {"Make him different from before. I like the way you are now."}
    assert len(list((tmp_path / "previews").glob("*.png"))) >= 4
    # the Python snippet of the page, as written
    code = re.search(r"```python\n(.*?)```", PAGE.read_text(), re.S).group(1)
    exec(compile(code, str(PAGE), "exec"), {})


def test_the_paper_commands_stop_cleanly_without_the_paper_models(my_videos, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-hf-home"))     # nothing cached
    for args in commands("paper"):
        res = runner.invoke(app, args)
        assert res.exit_code == 2, f"emollama {' '.join(args)}\n{res.output}"
        assert "Traceback" not in res.output and res.output.strip().startswith(("error", "invalid"))
    assert not (tmp_path / "mine-paper.zarr").exists()
