"""Fixtures shared by the extraction tests."""

import pytest


@pytest.fixture(scope="module")
def one_torch_thread():
    """MTCNN with 2 OpenMP threads slows down up to 10x when the 2 cores are shared; 1 thread is steady."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _write_clip(path, frames, fps: int = 25) -> None:
    """Encode [N, H, W, 3] uint8 frames as an H.264 mp4 (no sound) at ``fps``."""
    import av

    with av.open(str(path), "w") as c:
        vs = c.add_stream("libx264", rate=fps, options={"preset": "veryfast", "crf": "18"})
        vs.height, vs.width = frames.shape[1:3]
        vs.pix_fmt = "yuv420p"
        for f in frames:
            for pkt in vs.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                c.mux(pkt)
        for pkt in vs.encode():
            c.mux(pkt)


@pytest.fixture
def write_clip():
    """`write_clip(path, frames, fps=25)`: a clip built in the test (joined, cut, re-encoded real frames)."""
    return _write_clip
