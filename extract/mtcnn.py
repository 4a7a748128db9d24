"""MTCNN's detection cascade with its candidate crops made in one batched operation.

facenet-pytorch's ``detect_face`` cuts and resizes every candidate box of the second and third stages
in a Python loop: about 115 candidates a frame reach the second stage on the real sample clips, each
one a slice, a GPU sync (the box's image index is read from a device tensor) and a resize kernel. On a
GPU that loop, not the networks, is what MTCNN costs: on an H200, 16 frames took 260 ms through it and
28 ms here (bench-gpu). Here the crops come from a summed-area table of the frames, all boxes at once.
On a CPU the loop is cheaper than the table, so `detect` uses it there.

Same values as facenet-pytorch, not approximately: its resize is ``interpolate(mode="area")``, i.e.
adaptive average pooling, whose every output pixel is the sum of an integer-valued window (the frames
are uint8) divided by the window's height and then its width. The table gives each window's sum
exactly (integer arithmetic), and the divisions are done in the same order in float32. The stages,
thresholds, NMS and box regression are facenet-pytorch's own functions, called as its ``detect_face``
calls them, and `detect` returns what ``MTCNN.detect`` returns (tested on the real sample clips).
"""

from __future__ import annotations

import numpy as np
import torch
from facenet_pytorch.models.utils.detect_face import (
    batched_nms, batched_nms_numpy, bbreg, fixed_batch_process, generateBoundingBox, imresample, pad, rerec,
)

BOX_CHUNK = 4096   # candidate boxes cropped at a time (bounds the gather's memory)


def _table(imgs: torch.Tensor) -> torch.Tensor:
    """[B, C, H + 1, W + 1] summed-area table of uint8 images [B, C, H, W], exact in integers (int32
    where it cannot overflow), with a zero first row and column."""
    b, c, h, w = imgs.shape
    dtype = torch.int32 if 255 * h * w < 2**31 else torch.int64
    sat = torch.zeros((b, c, h + 1, w + 1), dtype=dtype, device=imgs.device)
    sat[:, :, 1:, 1:] = imgs.to(dtype).cumsum(2, dtype=dtype).cumsum(3, dtype=dtype)
    return sat


def _windows(start: torch.Tensor, length: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Adaptive pooling's windows: output i of `size` covers [start + floor(i L / size), start +
    ceil((i + 1) L / size)) of an input of length L. [K] -> two [K, size]."""
    i = torch.arange(size, device=start.device)
    lo = start[:, None] + (i * length[:, None]) // size
    hi = start[:, None] + ((i + 1) * length[:, None] + size - 1) // size
    return lo, hi


def area_crops(sat: torch.Tensor, image_inds: torch.Tensor, y: np.ndarray, ey: np.ndarray, x: np.ndarray,
               ex: np.ndarray, size: int) -> torch.Tensor:
    """``interpolate(img[i, :, y - 1:ey, x - 1:ex][None], (size, size), mode="area")`` for every box
    (facenet-pytorch's `pad` output, 1-based starts), as one float32 [K, C, size, size] tensor."""
    dev = sat.device
    r0 = torch.as_tensor(y - 1, dtype=torch.long, device=dev)
    c0 = torch.as_tensor(x - 1, dtype=torch.long, device=dev)
    rs, re = _windows(r0, torch.as_tensor(ey, dtype=torch.long, device=dev) - r0, size)
    cs, ce = _windows(c0, torch.as_tensor(ex, dtype=torch.long, device=dev) - c0, size)
    out = []
    for k in range(0, len(r0), BOX_CHUNK):
        s = slice(k, k + BOX_CHUNK)
        b = image_inds[s].long()[:, None, None]

        def at(r: torch.Tensor, c: torch.Tensor) -> torch.Tensor:   # [k, size, size, C]
            return sat[b, :, r[s][:, :, None], c[s][:, None, :]]

        total = at(re, ce) - at(rs, ce) - at(re, cs) + at(rs, cs)
        kh = (re[s] - rs[s]).float()[:, :, None, None]
        kw = (ce[s] - cs[s]).float()[:, None, :, None]
        out.append((total.float() / kh / kw).permute(0, 3, 1, 2).contiguous())   # the nets see NCHW memory, as there
    return torch.cat(out) if out else torch.zeros((0, sat.shape[1], size, size), device=dev)


def _stage_input(sat: torch.Tensor, image_inds: torch.Tensor, boxes: torch.Tensor, w: int, h: int,
                 size: int) -> torch.Tensor | None:
    """A stage's network input for its candidate boxes, or None where facenet-pytorch's loop would skip
    a box (an empty window after clipping), which this module does not imitate (`detect` falls back)."""
    y, ey, x, ex = pad(boxes, w, h)
    if not ((ey > y - 1) & (ex > x - 1)).all():
        return None
    return (area_crops(sat, image_inds, y, ey, x, ex, size) - 127.5) * 0.0078125


class _Skipped(Exception):
    pass


def _detect_face(imgs_u8: torch.Tensor, minsize: int, pnet, rnet, onet, threshold, factor: float):
    """facenet-pytorch's ``detect_face`` for uint8 images [B, H, W, 3] on the networks' device, with
    `area_crops` for the second and third stages. Returns per-image box arrays [k, 5] (x1, y1, x2, y2, p)."""
    u8 = imgs_u8.permute(0, 3, 1, 2)
    imgs = u8.type(next(pnet.parameters()).dtype)
    batch_size = len(imgs)
    h, w = imgs.shape[2:4]
    m = 12.0 / minsize
    minl = min(h, w) * m
    scales = []
    scale_i = m
    while minl >= 12:
        scales.append(scale_i)
        scale_i = scale_i * factor
        minl = minl * factor

    boxes, image_inds, picks, offset = [], [], [], 0
    for scale in scales:   # first stage: P-Net over the image pyramid, all images at once
        im_data = (imresample(imgs, (int(h * scale + 1), int(w * scale + 1))) - 127.5) * 0.0078125
        reg, probs = pnet(im_data)
        b, ii = generateBoundingBox(reg, probs[:, 1], scale, threshold[0])
        boxes.append(b)
        image_inds.append(ii)
        picks.append(batched_nms(b[:, :4], b[:, 4], ii, 0.5) + offset)
        offset += b.shape[0]
    boxes, image_inds = torch.cat(boxes), torch.cat(image_inds)
    pick = torch.cat(picks)
    boxes, image_inds = boxes[pick], image_inds[pick]
    pick = batched_nms(boxes[:, :4], boxes[:, 4], image_inds, 0.7)
    boxes, image_inds = boxes[pick], image_inds[pick]
    regw, regh = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    boxes = torch.stack([boxes[:, 0] + boxes[:, 5] * regw, boxes[:, 1] + boxes[:, 6] * regh,
                         boxes[:, 2] + boxes[:, 7] * regw, boxes[:, 3] + boxes[:, 8] * regh,
                         boxes[:, 4]]).permute(1, 0)
    boxes = rerec(boxes)
    sat = _table(u8)

    if len(boxes) > 0:   # second stage: R-Net on 24 x 24 crops
        im_data = _stage_input(sat, image_inds, boxes, w, h, 24)
        if im_data is None:
            raise _Skipped
        out0, out1 = (o.permute(1, 0) for o in fixed_batch_process(im_data, rnet))
        score = out1[1, :]
        ipass = score > threshold[1]
        boxes = torch.cat((boxes[ipass, :4], score[ipass].unsqueeze(1)), dim=1)
        image_inds = image_inds[ipass]
        mv = out0[:, ipass].permute(1, 0)
        pick = batched_nms(boxes[:, :4], boxes[:, 4], image_inds, 0.7)
        boxes, image_inds, mv = boxes[pick], image_inds[pick], mv[pick]
        boxes = rerec(bbreg(boxes, mv))

    if len(boxes) > 0:   # third stage: O-Net on 48 x 48 crops
        im_data = _stage_input(sat, image_inds, boxes, w, h, 48)
        if im_data is None:
            raise _Skipped
        out = fixed_batch_process(im_data, onet)
        out0, out2 = out[0].permute(1, 0), out[2].permute(1, 0)
        score = out2[1, :]
        ipass = score > threshold[2]
        boxes = torch.cat((boxes[ipass, :4], score[ipass].unsqueeze(1)), dim=1)
        image_inds = image_inds[ipass]
        boxes = bbreg(boxes, out0[:, ipass].permute(1, 0))
        pick = batched_nms_numpy(boxes[:, :4], boxes[:, 4], image_inds, 0.7, "Min")
        boxes, image_inds = boxes[pick], image_inds[pick]

    boxes = boxes.cpu().numpy()
    image_inds = image_inds.cpu().numpy()
    return [boxes[image_inds == i] for i in range(batch_size)]


def detect(mtcnn, frames: np.ndarray, batched: bool | None = None) -> tuple[list[np.ndarray | None], list]:
    """``mtcnn.detect(frames)`` (a facenet-pytorch ``MTCNN``; frames [B, H, W, 3] uint8) with batched
    crops: per frame, boxes [k, 4] largest first and probabilities [k], or None and [None] without a
    face. Where facenet-pytorch's own loop would skip a candidate, its ``detect`` runs instead.

    ``batched``: None = on every device but the CPU. On a CPU the loop is the cheaper one (one thread,
    8 frames of 640 x 360 and 1,300 candidates: the table alone takes 266 ms, the loop's crops 119 ms),
    so there facenet-pytorch's ``detect`` runs; the values are the same either way."""
    if len(frames) and min(frames.shape[1:3]) * (12.0 / mtcnn.min_face_size) < 12:
        # shorter than the smallest face MTCNN looks for: its image pyramid has no level (facenet-pytorch
        # would fail with "torch.cat(): expected a non-empty list"), and no face can be found
        return [None] * len(frames), [[None]] * len(frames)
    if batched is None:
        batched = torch.device(mtcnn.device).type != "cpu"
    if not batched:
        b, p = mtcnn.detect(frames)
        return list(b), list(p)
    try:
        with torch.no_grad():
            per_image = _detect_face(torch.as_tensor(np.ascontiguousarray(frames), device=mtcnn.device),
                                     mtcnn.min_face_size, mtcnn.pnet, mtcnn.rnet, mtcnn.onet,
                                     mtcnn.thresholds, mtcnn.factor)
    except _Skipped:
        b, p = mtcnn.detect(frames)
        return list(b), list(p)
    boxes: list = []
    probs: list = []
    for box in per_image:
        if len(box) == 0:
            boxes.append(None)
            probs.append([None])
            continue
        if mtcnn.select_largest:
            box = box[np.argsort((box[:, 2] - box[:, 0]) * (box[:, 3] - box[:, 1]))[::-1]]
        boxes.append(box[:, :4])
        probs.append(box[:, 4])
    return boxes, probs
