"""A stand-in for an encoder on a fast, busy accelerator, to measure the overlap of preparation and
encoding on a machine without one (benchmarks and tests; its features mean nothing).

    [extract.encoders.local]            # replace a view (or add an entry) with it
    encoder = "slow_device"
    model = "some/empty/folder"         # any local folder: nothing is read from it
    input = "face_frames"               # waveform | face_frames | face_clip | frame
    seconds = 0.25                      # wall time of each call (one micro-batch of clips)

Each call waits `seconds` without using the CPU (a sleep stands in for the time a GPU takes), then
gives each clip the mean and standard deviation of every 4096th value of its input (`stats` [2]: a
few hundred values, so the stand-in takes no CPU from the preparation it is meant to expose).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from emollama.extract.registry import INPUTS, Encoder, register_encoder
from emollama.extract.settings import value, value_dict


STRIDE = 4096   # every STRIDE-th input value enters the stats


@dataclass(frozen=True)
class SlowDeviceOptions:
    input: str = value(spec="encoder", choices=tuple(INPUTS))   # the input kind it takes
    seconds: float = value(0.25, spec="encoder", min=0.0)       # wall time per call (a micro-batch)


@register_encoder
class SlowDeviceEncoder(Encoder):
    """`seconds` of wall time and no CPU per call; per clip the mean and std of a sample of its input."""

    name = "slow_device"
    Options = SlowDeviceOptions
    pooling = {"stats": "mean"}

    @classmethod
    def input_of(cls, options: SlowDeviceOptions | None = None) -> str:
        if options is None:
            raise ValueError("the slow_device encoder takes the input its options name (input = ...)")
        return options.input

    @classmethod
    def from_pretrained(cls, folder, name, kwargs, options, *, identity, device, batch_size, source):
        import torch

        if options is None:
            raise ValueError(f"{source.model}: the slow_device encoder needs its options: input (and seconds)")
        enc = cls(torch.nn.Identity(), weights=identity, device="cpu", batch_size=batch_size)
        enc.options, enc.dim, enc.layer = options, 2, "stats"
        enc.params = {"options": value_dict(options)}
        enc.declare_outputs({"stats": (2,)})
        return enc

    def _encode(self, inputs: list) -> list[dict[str, np.ndarray]]:
        time.sleep(self.options.seconds)
        out = []
        for x in inputs:
            sample = np.asarray(x).reshape(-1)[::STRIDE].astype(np.float32)
            out.append({"stats": np.array([sample.mean(), sample.std()], np.float32)})
        return out
