"""extract.mtcnn: MTCNN's cascade with batched candidate crops gives facenet-pytorch's values exactly."""

from pathlib import Path

import numpy as np
import pytest
import torch
from torch.nn.functional import interpolate

from emollama.extract import mtcnn
from emollama.extract.decode import probe, read_frames
from emollama.extract.faces import FaceDetector, detect_positions, detection_frames
from emollama.extract.sample import render_frames

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def net():
    return FaceDetector().mtcnn


def same_as_facenet(net, frames: np.ndarray) -> int:
    """Assert `mtcnn.detect` == `net.detect` frame by frame, bit for bit; the number of boxes."""
    want_b, want_p = net.detect(frames)
    got_b, got_p = mtcnn.detect(net, frames, batched=True)
    assert len(got_b) == len(got_p) == len(frames)
    n = 0
    for wb, wp, gb, gp in zip(want_b, want_p, got_b, got_p):
        if wb is None:
            assert gb is None and list(gp) == [None]
            continue
        assert np.array_equal(gb, np.asarray(wb, gb.dtype)) and np.array_equal(gp, np.asarray(wp, gp.dtype))
        n += len(wb)
    return n


def test_area_crops_are_facenets_area_resize_bit_for_bit():
    rng = np.random.default_rng(0)
    h, w = 90, 160
    img = torch.as_tensor(rng.integers(0, 256, (2, 3, h, w), dtype=np.uint8))
    k = 200
    y = rng.integers(1, h, k)
    x = rng.integers(1, w, k)
    ey = np.minimum(y + rng.integers(0, 70, k), h)   # windows of 1 pixel up to larger than the crop
    ex = np.minimum(x + rng.integers(0, 70, k), w)
    y[:3], ey[:3], x[:3], ex[:3] = 1, h, 1, w        # the whole image, and its edges
    image_inds = torch.as_tensor(rng.integers(0, 2, k))
    sat = mtcnn._table(img)
    assert sat.dtype == torch.int32 and sat[:, :, -1, -1].tolist() == img.sum((2, 3), dtype=torch.int64).tolist()
    for size in (24, 48):
        want = torch.cat([interpolate(img.float()[image_inds[i], :, y[i] - 1:ey[i], x[i] - 1:ex[i]][None],
                                      (size, size), mode="area") for i in range(k)])
        got = mtcnn.area_crops(sat, image_inds, y, ey, x, ex, size)
        assert got.shape == (k, 3, size, size) and got.is_contiguous()
        assert torch.equal(got, want)


def test_detect_is_facenets_detect_on_drawn_faces(net):
    frames = render_frames("happy", np.random.default_rng(3), 6, (320, 240), np.zeros(6), peak=3)
    assert same_as_facenet(net, frames) >= 6


def test_detect_without_a_face_says_so_as_facenet_does(net):
    frames = np.full((2, 120, 160, 3), 128, np.uint8)
    assert net.detect(frames)[0].tolist() == [None, None]
    assert same_as_facenet(net, frames) == 0


def test_a_window_facenet_would_skip_falls_back_to_facenet(net, monkeypatch):
    frames = render_frames("sad", np.random.default_rng(5), 2, (320, 240), np.zeros(2), peak=1)
    called = []
    real = net.detect

    def facenet_detect(f):
        called.append(len(f))
        return real(f)

    monkeypatch.setattr(mtcnn, "_stage_input", lambda *a, **k: None)
    monkeypatch.setattr(net, "detect", facenet_detect)
    boxes, probs = mtcnn.detect(net, frames, batched=True)
    assert called == [2] and len(boxes) == 2 and all(b is not None for b in boxes)


def test_on_the_cpu_detect_is_facenets_own_loop(net, monkeypatch):
    monkeypatch.setattr(mtcnn, "_detect_face", lambda *a, **k: pytest.fail("batched crops on the CPU"))
    frames = np.full((1, 120, 160, 3), 128, np.uint8)
    assert mtcnn.detect(net, frames) == ([None], [[None]])


@pytest.mark.samples
@pytest.mark.slow
def test_detect_is_facenets_detect_on_real_clips(net, samples_dir: Path):
    """Three real clips' detection frames in one batch, as the encoding side sends them."""
    clips = sorted(samples_dir.glob("*.mp4"))[:3]
    smalls = []
    for path in clips:
        info = probe(path)
        idx = detect_positions(info.n_frames, max(1, info.n_frames // 4))
        smalls.append(detection_frames(read_frames(path, idx, info=info), 640)[0])
    smalls = [s for s in smalls if s.shape[1:] == smalls[0].shape[1:]]
    assert same_as_facenet(net, np.concatenate(smalls)) >= len(smalls) * 4
