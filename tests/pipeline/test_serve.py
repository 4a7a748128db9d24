"""`emollama serve`'s API with the tiny profile: a real clip answers what `infer` answers, bad uploads get
their 4xx and reason, server-side paths stay under --allow-dir, the token is enforced, concurrent
requests are batched with the results of one at a time, and no upload is left behind."""

from __future__ import annotations

import concurrent.futures as cf
import json
import os
import random
import shutil
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from emollama.pipeline.cli import app
from emollama.pipeline.serve import ServeSettings, Service, create_app
from emollama.pipeline.inference import Predictor
from emollama.train.tiny import TINY_WARNING

runner = CliRunner()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from tiny_runs import tiny_run

    tmp = tmp_path_factory.mktemp("serve")
    run, _, data = tiny_run(tmp)
    return {"tmp": tmp, "run": run, "data": data, "predictor": Predictor.from_run(run)}


def _service(trained, tmp_path, **kw) -> Service:
    kw.setdefault("upload_dir", str(tmp_path / "uploads"))
    return Service(trained["predictor"], ServeSettings(run=str(trained["run"]), **kw))


@pytest.fixture
def client(trained, tmp_path):
    svc = _service(trained, tmp_path)
    with TestClient(create_app(svc)) as c:
        yield c, svc
    svc.close()


def _upload(c, path: Path, name: str | None = None, ctype: str = "video/mp4", **data):
    with open(path, "rb") as f:
        return c.post("/v1/predict", files={"file": (name or path.name, f, ctype)}, data=data)


def test_a_real_clip_answers_what_infer_answers_and_a_resend_is_not_extracted(client, trained, samples_dir, tmp_path):
    c, svc = client
    clip = sorted(samples_dir.glob("*.mp4"))[0]
    res = _upload(c, clip, subtitle="I did not expect that.")
    assert res.status_code == 200, res.text
    d = res.json()
    assert d["file"] == clip.name and d["extracted"] is True and d["error"] is None
    assert d["label"] in trained["predictor"].labels and abs(sum(d["probabilities"].values()) - 1) < 1e-5
    assert d["subtitle"] == "I did not expect that." and d["note"] == TINY_WARNING
    assert d["face"]["found"] is True and d["face"]["frames"] > 0 and d["reasoning"]
    sheet = c.get(d["sheet_url"])
    assert sheet.status_code == 200 and sheet.headers["content-type"] == "image/png"
    assert sheet.content[:8] == b"\x89PNG\r\n\x1a\n"
    # the same content again, under another name: read from the eval store, the same answer
    again = _upload(c, clip, name="renamed.mp4", subtitle="I did not expect that.").json()
    assert again["extracted"] is False and again["id"] == d["id"]
    assert (again["label"], again["probabilities"], again["reasoning"]) == (d["label"], d["probabilities"], d["reasoning"])
    # infer on the file: it finds the clip in the run's eval store by its content, with the same result
    res = runner.invoke(app, ["infer", "--run", str(trained["run"]), str(clip), "--subtitle", "I did not expect that.",
                              "--json"])
    assert res.exit_code == 0, res.output
    [inf] = json.loads(res.output)
    assert inf["extracted"] is False and inf["store_id"] == d["id"]
    assert (inf["label"], inf["probabilities"], inf["reasoning"], inf["face"]) == \
        (d["label"], d["probabilities"], d["reasoning"], d["face"])


def test_bad_uploads_get_their_4xx_and_reason(trained, tmp_path):
    svc = _service(trained, tmp_path, max_upload_mb=0.05)
    c = TestClient(create_app(svc))
    empty, junk, text = tmp_path / "empty.mp4", tmp_path / "junk.mp4", tmp_path / "notes.txt"
    empty.write_bytes(b"")
    junk.write_bytes(random.Random(0).randbytes(20_000))   # seeded: the same bytes every run
    text.write_text("not a video")
    big = tmp_path / "big.mp4"
    big.write_bytes(os.urandom(200_000))
    cases = [(empty, "video/mp4", 422, "the file is empty (0 bytes)"),
             (junk, "video/mp4", 422, "not a usable video: cannot open"),
             (text, "text/plain", 415, "the upload's content type is 'text/plain': send a video"),
             (big, "video/mp4", 413, "the upload is over the limit of 0.05 MB (--max-upload-mb)")]
    for path, ctype, status, reason in cases:
        res = _upload(c, path, ctype=ctype)
        assert res.status_code == status, (path.name, res.text)
        assert reason in res.json()["detail"], res.json()
        assert res.json()["note"] == TINY_WARNING         # the fixture's warning in every answer
        assert str(svc.uploads) not in res.text          # the server's own paths stay its own
    # over the limit without a Content-Length (chunked): 413 as the bytes pass it
    boundary = "b0undary"
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"big.mp4\"\r\n"
            "Content-Type: video/mp4\r\n\r\n").encode()

    def chunks():
        yield head
        for _ in range(20):
            yield os.urandom(10_000)
        yield f"\r\n--{boundary}--\r\n".encode()

    res = c.post("/v1/predict", content=chunks(), headers={"content-type": f"multipart/form-data; boundary={boundary}"})
    assert res.status_code == 413 and "over the limit" in res.json()["detail"]
    # neither a file nor a path, and a body that is no form
    assert c.post("/v1/predict", data={"subtitle": "hi"}).status_code == 422
    res = c.post("/v1/predict", data={"sheet": "perhaps"}, files={"file": ("a.mp4", b"x", "video/mp4")})
    assert res.status_code == 422 and res.json()["detail"].startswith("invalid request: body.sheet: ")
    assert res.json()["note"] == TINY_WARNING
    assert c.post("/v1/predict", json={"path": "x"}).status_code == 422
    svc.close()
    assert not svc.uploads.exists()


def test_server_side_paths_only_under_allow_dir(trained, tmp_path, samples_dir):
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    clip = shutil.copy(sorted(samples_dir.glob("*.mp4"))[1], allowed / "inside.mp4")
    outside = shutil.copy(sorted(samples_dir.glob("*.mp4"))[1], tmp_path / "outside.mp4")
    (allowed / "link.mp4").symlink_to(outside)
    off = TestClient(create_app(_service(trained, tmp_path)))
    res = off.post("/v1/predict", data={"path": str(clip)})
    assert res.status_code == 403 and "--allow-dir" in res.json()["detail"]
    svc = _service(trained, tmp_path, allow_dir=str(allowed))
    c = TestClient(create_app(svc))
    res = c.post("/v1/predict", data={"path": "inside.mp4"})
    assert res.status_code == 200, res.text
    assert res.json()["label"] and res.json()["file"] == "inside.mp4"
    for path in (str(outside), "../outside.mp4", "link.mp4", "/etc/hostname"):
        res = c.post("/v1/predict", data={"path": path})
        assert res.status_code == 403, (path, res.text)
        assert "outside the allowed folder" in res.json()["detail"]
    assert c.post("/v1/predict", data={"path": "nosuch.mp4"}).status_code == 404
    svc.close()


def test_the_token_is_enforced_on_every_api_endpoint(trained, tmp_path, samples_dir):
    svc = _service(trained, tmp_path, token="s3cret")
    c = TestClient(create_app(svc))
    clip = sorted(samples_dir.glob("*.mp4"))[0]
    for method, url in (("get", "/v1/health"), ("get", "/v1/run"), ("get", "/v1/sheets/x.png"), ("post", "/v1/predict")):
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            res = getattr(c, method)(url, headers=headers)
            assert res.status_code == 401, (url, headers, res.text)
            assert res.headers["www-authenticate"] == "Bearer" and "bearer token" in res.json()["detail"]
    ok = {"Authorization": "Bearer s3cret"}
    assert c.get("/v1/health", headers=ok).json()["token_required"] is True
    with open(clip, "rb") as f:
        res = c.post("/v1/predict", files={"file": (clip.name, f, "video/mp4")}, headers=ok)
    assert res.status_code == 200 and res.json()["label"]
    # the page and the schema are static (the page asks for the token and sends it)
    assert c.get("/").status_code == 200 and "Bearer" in c.get("/").text
    assert c.get("/openapi.json").json()["paths"]["/v1/predict"]["post"]
    svc.close()


def test_health_and_run_describe_the_run_with_the_tiny_warning(client, trained):
    c, _ = client
    h = c.get("/v1/health").json()
    assert h["status"] == "ok" and h["note"] == TINY_WARNING and h["token_required"] is False
    r = c.get("/v1/run").json()
    run = trained["predictor"].run
    assert r["labels"] == run.labels and r["profile"] == "tiny" and r["prompt_style"] == run.config.data.prompt
    assert list(r["feature_sets"].values()) == run.feature_keys and r["note"] == TINY_WARNING
    assert set(r["feature_profiles"].values()) == {"tiny"}
    docs = c.get("/docs")
    assert docs.status_code == 200 and "swagger" in docs.text.lower()


def test_eight_requests_at_once_are_batched_with_the_results_of_one_at_a_time(trained, tmp_path):
    clips = sorted((trained["data"] / "video").glob("*.mp4"))
    assert len(clips) == 8
    one = _service(trained, tmp_path, batch_wait_s=0.0)
    c1 = TestClient(create_app(one))
    alone = [_upload(c1, p).json() for p in clips]
    assert one.batcher.batches == [1] * 8
    many = _service(trained, tmp_path, batch_wait_s=1.0, batch_max=8)
    c8 = TestClient(create_app(many))
    with cf.ThreadPoolExecutor(8) as ex:
        together = list(ex.map(lambda p: _upload(c8, p), clips))
    assert all(r.status_code == 200 for r in together), [r.text for r in together]
    assert max(many.batcher.batches) > 1 and sum(many.batcher.batches) == 8
    for a, b in zip(alone, (r.json() for r in together)):
        assert (a["id"], a["label"], a["probabilities"], a["reasoning"]) == \
            (b["id"], b["label"], b["probabilities"], b["reasoning"])
        assert b["extracted"] is False      # the training store holds them (found by content)
    # nothing is left of the uploads, and the folder goes when the server stops
    assert list(many.uploads.iterdir()) == [] and list(one.uploads.iterdir()) == []
    one.close()
    many.close()
    assert list((tmp_path / "uploads").iterdir()) == []


def test_the_serve_command_refuses_bad_options_in_one_line(trained, tmp_path):
    res = runner.invoke(app, ["serve", "--run", str(trained["run"]), "--port", "0", "--max-upload-mb", "0",
                              "--allow-dir", str(tmp_path / "nosuch")])
    assert res.exit_code == 2
    [err] = [l for l in res.output.splitlines() if l.startswith("error:")]
    assert "--port 0" in err and "--max-upload-mb 0" in err and "--allow-dir" in err
    res = runner.invoke(app, ["serve", "--run", str(tmp_path / "norun")])
    assert res.exit_code == 2 and "Traceback" not in res.output


def test_a_clip_with_no_face_is_answered_with_its_warning(trained, tmp_path):
    """The face information and its warning reach the client (the page lists the warnings)."""
    import av
    import numpy as np

    clip = tmp_path / "wall.mp4"
    with av.open(str(clip), "w") as c:
        vs = c.add_stream("libx264", rate=25, options={"preset": "veryfast"})
        vs.height, vs.width, vs.pix_fmt = 96, 128, "yuv420p"
        for i in range(40):
            frame = np.full((96, 128, 3), (40 + i, 90, 160), np.uint8)
            for pkt in vs.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                c.mux(pkt)
        for pkt in vs.encode():
            c.mux(pkt)
    strict = _service(trained, tmp_path)
    res = _upload(TestClient(create_app(strict)), clip)
    assert res.status_code == 422 and "no audio stream" in res.json()["detail"]    # the run's sets: fail
    strict.close()
    svc = _service(trained, tmp_path, missing_audio="silence")
    res = _upload(TestClient(create_app(svc)), clip)
    assert res.status_code == 200, res.text
    d = res.json()
    assert d["face"]["found"] is False and d["label"] in trained["predictor"].labels
    assert d["warnings"] == ["no face found: whole frames were used, so the label rests on the voice, the words "
                             "and the scene"]
    svc.close()


def test_a_timeline_upload_answers_windows_cuts_and_the_plot(trained, tmp_path, samples_dir):
    from test_timeline import join_clips

    from emollama.extract.windows import scan_cuts

    single = [p for p in sorted(samples_dir.glob("sample_*.mp4")) if not scan_cuts(p)[0]]
    video = tmp_path / "talk.mp4"
    [join] = join_clips([single[0], single[1]], video)
    svc = _service(trained, tmp_path)
    c = TestClient(create_app(svc))
    with open(video, "rb") as f:
        res = c.post("/v1/timeline", files={"file": ("talk.mp4", f, "video/mp4")}, data={"window": "2", "hop": "1"})
    assert res.status_code == 200, res.text
    d = res.json()
    assert len(d["cuts"]) == 1 and join <= d["cuts"][0] <= join + 0.21
    assert len(d["windows"]) >= 4 and all(w["label"] in trained["predictor"].labels for w in d["windows"])
    assert d["source"] == "talk.mp4" and d["note"] == TINY_WARNING
    png, table = c.get(d["plot_url"]), c.get(d["csv_url"])
    assert png.status_code == 200 and png.content[:8] == b"\x89PNG\r\n\x1a\n"
    assert table.status_code == 200 and len(table.text.strip().splitlines()) == len(d["windows"]) + 1
    with open(video, "rb") as f:      # again: every window is read from the eval store
        again = c.post("/v1/timeline", files={"file": ("talk.mp4", f, "video/mp4")}, data={"window": "2", "hop": "1"})
    assert again.status_code == 200 and not any(w["extracted"] for w in again.json()["windows"])
    bad = c.post("/v1/timeline", files={"file": ("talk.mp4", b"\x00" * 100, "video/mp4")})
    assert bad.status_code == 422 and "not a usable video" in bad.json()["detail"]
    assert c.get("/v1/timelines/../x/timeline.png").status_code == 404
    svc.close()
    assert list((tmp_path / "uploads").iterdir()) == []
