"""GPU benchmark of both stages at the paper's sizes, random weights, no download (`make bench-gpu`).

Made for a lent GPU machine (one H100 or H200) that starts bare and offline: `make gpu-wheels`
(run where PyPI is reachable) puts the missing wheels in .whl/ and the ten real sample clips in
.bench/clips/; `make bench-gpu` installs the wheels into /tmp/site and runs this script. It ends
with ONE summary table (the last ~40 lines of output), also written with every number as JSON to
$OUT (or --out) when set.

Part 1, extraction: the four encoders at paper size (HuBERT-large, ViT-MAE-large, VideoMAE-large,
EVA ViT-g/14 at 448, 40 blocks) with RANDOM weights built from their configs, fp16 on the GPU, over
the real clips repeated to --n ids, through the project's real path: `pipeline.extraction.run_extract`
with the in-process executor (workers 0), MTCNN faces (by default batched for 16 clips on the GPU:
--detect-on), a Zarr store on local disk (/tmp). After a
warm-up (4 clips) and a short calibration run (8 clips), --n is capped so the timed run fits
--extract-budget-s. Reported: clips/s, GPU busy % (NVML; else encoder time over wall), peak GPU
memory, and the time split per stage as scripts/bench_extract.py prints it. Before it, MTCNN alone on
the detection frames of a few real clips (`bench_mtcnn`): facenet-pytorch's loop against `extract.mtcnn`'s batched
crops, their times and whether their boxes agree. After it, the same extraction with faces
tracked the other way (--detect-on prep <-> encoder) for about --compare-budget-s: its clips/s.

    How the random encoders get in (no project file is edited): `extract.step` loads encoders with
    `load_encoders(settings.encoders, ...)`, a name it imported from `extract.encoders`, so this script
    replaces `extract.step.load_encoders` (patching `extract.encoders.load_encoders` would not reach it)
    with a function returning `extract.encoders.wrap_model(view, random_model(view, size))`, i.e.
    `random_encoder` built directly on the GPU. It also replaces `pipeline.extraction.check_models`,
    which would look for the paper's hub ids in the HF cache (the random encoders need none).
    HF_HUB_OFFLINE=1 is set in the environment, so nothing can be downloaded by accident.

Part 2, training: a LLaMA-2-7B-shaped LM (train.params.LLAMA2_7B) with random weights, built on the
GPU in bf16 (parameters are counted first on the meta device, as `emollama params` does), LoRA r64 /
alpha 16 / dropout 0.05 on q_proj, v_proj (train.model.add_lora) and the four paper projectors
(train.model.Projectors, shapes from train.params.paper_sets), gradient checkpointing as
train.model.build_model sets it, bf16 autocast, AdamW, gradient clipping, through the project's
EmoModel.forward on random features and token ids of a realistic prompt (260 feature slots + ~80 text
+ ~40 answer tokens), batch 4. Reported: samples/s, tokens/s, peak GPU memory, MFU.

    MFU convention: model FLOPs per step = 6 * N * T, with N = every parameter of the model (frozen
    LM + LoRA + projectors) and T = the non-padding tokens of the batch; attention FLOPs left out.
    (With a frozen base and checkpointing the executed work is also about 6NT: forward 2N, recompute
    2N, input-gradient backward 2N, no weight gradients for frozen weights.) Peak: dense bf16,
    989 TFLOP/s for H100 SXM / H200, 756 for H100 PCIe, 835 for H100 NVL (--peak-tflops overrides).

--cpu-smoke (automatic when CUDA is absent): the four paper-size encoders on ONE real clip on the CPU
(fp32), each view's stored output shape and the peak RSS; then part 2 with the tiny Llama config
(the 7B one does not fit) for 2 steps, to show the code path works.

    python scripts/bench_gpu.py [--clips .bench/clips] [--n 300] [--steps 20] [--batch 4] [--cpu-smoke]
    python scripts/bench_gpu.py --check-imports
"""

from __future__ import annotations

import argparse
import gc
import importlib
import json
import os
import resource
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# as `emollama extract` does before torch loads (extract.prep.sleeping_idle_threads)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def _namespace() -> None:
    """The project installs as ``emollama.*`` (its folders mapped by pyproject). On a bare machine
    without the install, link the four folders under a temporary ``emollama`` namespace instead."""
    try:
        import emollama.store  # noqa: F401
        return
    except ImportError:
        pass
    shim = Path(tempfile.mkdtemp(prefix="emollama-ns-"))
    (shim / "emollama").mkdir()
    for part in ("corpora", "extract", "store", "train", "pipeline"):
        (shim / "emollama" / part).symlink_to(REPO / part, target_is_directory=True)
    sys.path.insert(0, str(shim))
    for name in [m for m in sys.modules if m == "emollama" or m.startswith("emollama.")]:
        del sys.modules[name]


_namespace()
os.environ.setdefault("HF_HUB_OFFLINE", "1")          # nothing may be downloaded at run time
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

VIEWS = ("audio", "local", "temporal", "global")
SIZES = {"audio": "large", "local": "large", "temporal": "large", "global": "giant"}
GiB = 1024 ** 3

# (module, distribution, where it comes from on the GPU machine)
NEEDED = [
    ("numpy", "numpy", "image"), ("PIL", "pillow", "image"), ("yaml", "pyyaml", "image"),
    ("packaging", "packaging", "image"), ("typing_extensions", "typing-extensions", "image"),
    ("tqdm", "tqdm", "image"), ("fsspec", "fsspec", "image"), ("requests", "requests", "image"),
    ("torch", "torch", "image"), ("torchvision", "torchvision", "image"),
    ("transformers", "transformers", "image"), ("peft", "peft", "image"), ("timm", "timm", "image"),
    ("safetensors", "safetensors", "image"),
    ("zarr", "zarr", "wheel"), ("numcodecs", "numcodecs", "wheel"), ("donfig", "donfig", "wheel"),
    ("google_crc32c", "google-crc32c", "wheel"), ("av", "av", "wheel"),
    ("facenet_pytorch", "facenet-pytorch", "wheel"),
]
OPTIONAL = [("pynvml", "nvidia-ml-py", "image")]
PROJECT = ["emollama.store", "emollama.extract.decode", "emollama.extract.faces", "emollama.extract.encoders", "emollama.extract.step",
           "emollama.pipeline.extraction", "emollama.train.model", "emollama.train.params"]


def _version(dist: str) -> str:
    try:
        from importlib.metadata import version
        return version(dist)
    except Exception:  # noqa: BLE001
        return "?"


def check_imports(verbose: bool = True) -> list[str]:
    """Import every module the benchmark needs; print what is missing and how to fix it."""
    missing, rows, absent = [], [], set()
    for mod, dist, where in NEEDED + OPTIONAL:
        try:
            importlib.import_module(mod)
            rows.append(f"  ok       {mod:<18} {dist} {_version(dist)}")
        except Exception as e:  # noqa: BLE001 - ImportError, or a wheel whose shared library fails
            opt = (mod, dist, where) in OPTIONAL
            other = isinstance(e, ModuleNotFoundError) and e.name and e.name.split(".")[0] != mod
            state = "optional" if opt else ("NEEDS" if other else "MISSING")
            rows.append(f"  {state:<8} {mod:<18} ({where}) {type(e).__name__}: {e}")
            if not opt:
                missing.append(mod)
                if not other:
                    absent.add(mod)
    if not missing:
        for mod in PROJECT:
            try:
                importlib.import_module(mod)
                rows.append(f"  ok       {mod} (project)")
            except Exception as e:  # noqa: BLE001
                rows.append(f"  BROKEN   {mod} (project) {type(e).__name__}: {e}")
                missing.append(mod)
    try:
        from packaging.version import Version
        te = _version("typing-extensions")
        if te != "?" and Version(te) < Version("4.12"):
            rows.append(f"  OLD      typing-extensions {te}: zarr 3.1 needs >= 4.12 (add it to scripts/gpu_wheels.sh)")
            missing.append("typing_extensions>=4.12")
    except Exception:  # noqa: BLE001
        pass
    if verbose or missing:
        print("import check (python %s at %s):" % (sys.version.split()[0], sys.executable))
        print("\n".join(rows))
    if missing:
        wheel = [m for m, _, w in NEEDED if w == "wheel" and m in absent]
        image = [m for m, _, w in NEEDED if w == "image" and m in missing]
        print(f"\nMISSING: {', '.join(missing)}")
        if image:
            print(f"fix: {', '.join(image)} come with the GPU image's python3: run with that python\n"
                  f"     (this is {sys.executable}); the NEEDS lines fail for want of one of them")
        if wheel:
            print("fix: on a machine with PyPI run `make gpu-wheels` (downloads cp312 wheels into .whl/ and the\n"
                  "     sample clips into .bench/clips/), carry [\".whl\", \".bench\"] and run `make bench-gpu`,\n"
                  "     which installs them: pip install --no-index --no-deps --target /tmp/site .whl/*.whl;\n"
                  "     PYTHONPATH=/tmp/site python3 scripts/bench_gpu.py")
        if not wheel and not image:
            print(f"fix: a project module does not import: check PYTHONPATH=/tmp/site and the traceback above")
    return missing


# --------------------------------------------------------------------------------------------
# helpers

def rss_gib() -> float:
    """Peak resident memory of this process (GiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GiB


class GpuSampler:
    """Mean GPU utilisation (NVML, every 0.1 s) over a `with` block; None when NVML is absent."""

    def __init__(self, index: int = 0, period: float = 0.1):
        self.period, self.samples, self.error = period, [], None
        self._stop = threading.Event()
        try:
            import pynvml
            pynvml.nvmlInit()
            vis = os.environ.get("CUDA_VISIBLE_DEVICES", "")
            idx = int(vis.split(",")[index]) if vis and vis.split(",")[index].strip().isdigit() else index
            self._nvml, self._h = pynvml, pynvml.nvmlDeviceGetHandleByIndex(idx)
        except Exception as e:  # noqa: BLE001
            self._nvml, self.error = None, f"{type(e).__name__}: {e}"

    def _run(self):
        while not self._stop.is_set():
            try:
                self.samples.append(self._nvml.nvmlDeviceGetUtilizationRates(self._h).gpu)
            except Exception as e:  # noqa: BLE001
                self.error = f"{type(e).__name__}: {e}"
                return
            self._stop.wait(self.period)

    def __enter__(self):
        if self._nvml is not None:
            self._t = threading.Thread(target=self._run, daemon=True)
            self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        if self._nvml is not None:
            self._t.join(timeout=2)

    @property
    def mean(self) -> float | None:
        return sum(self.samples) / len(self.samples) if self.samples else None


def peak_tflops(name: str, override: float | None) -> tuple[float | None, str]:
    if override:
        return override, "--peak-tflops"
    n = name.upper()
    if "H100" in n and "PCIE" in n:
        return 756.0, "H100 PCIe dense bf16"
    if "H100" in n and "NVL" in n:
        return 835.0, "H100 NVL dense bf16"
    if "H100" in n or "H200" in n or "GH200" in n:
        return 989.0, "H100/H200 SXM dense bf16"
    if "A100" in n:
        return 312.0, "A100 dense bf16"
    return None, "unknown card: pass --peak-tflops"


# --------------------------------------------------------------------------------------------
# part 1: extraction

def build_random_encoders(device: str, batch_size: int, timings: dict) -> dict:
    """The four paper-size encoders with random weights; on CUDA built directly on the GPU."""
    import torch

    from emollama.extract.encoders import random_model, wrap_model

    encs = {}
    for view in VIEWS:
        size = SIZES[view]
        t = time.perf_counter()
        model = None
        if device.startswith("cuda"):
            try:
                with torch.device(device):      # random init on the GPU: seconds, not a minute of CPU
                    model = random_model(view, size)
            except Exception as e:  # noqa: BLE001 - fall back to the CPU build
                print(f"  building {view} on {device} failed ({type(e).__name__}: {e}); building on the CPU")
                model = None
        if model is None:
            model = random_model(view, size)
        encs[view] = wrap_model(view, model, weights=f"random:{view}-{size}", device=device,
                                batch_size=batch_size)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        timings[view] = time.perf_counter() - t
        n = sum(p.numel() for p in encs[view].model.parameters())
        print(f"  {view:<9} {type(encs[view]).__name__:<16} {n / 1e6:8.1f} M params  {timings[view]:5.1f} s")
    return encs


_RANDOM_ENCODERS: dict = {}   # what the hook hands out; emptied by free_extract_models


def install_encoder_hook(encs: dict) -> None:
    """Replace the name extract.step calls to load encoders: it returns our random ones."""
    import emollama.extract.step as step

    def load_random_encoders(cfg, *, device="auto", offline=None, batch_size=32, home=None):
        if not _RANDOM_ENCODERS:
            raise RuntimeError("bench_gpu: the random encoders were freed")
        return dict(_RANDOM_ENCODERS)

    import emollama.pipeline.extraction as extraction

    _RANDOM_ENCODERS.clear()
    _RANDOM_ENCODERS.update(encs)
    step.load_encoders = load_random_encoders
    step._MODELS.clear()
    extraction.check_models = lambda **kw: False   # the random encoders need no weights


def extract_config(root: Path, store: Path, args):
    from emollama.pipeline.config import load_config

    return load_config(None, {
        "dataset": {"kind": "folder", "root": str(root)},
        "extract": {"store": str(store), "profile": "paper", "offline": False, "workers": 0,
                    "compact": False, "device": args.device, "batch_size": args.batch_size,
                    "micro_batch": args.micro_batch, "batch_clips": args.batch_clips,
                    "faces": {"detect_on": args.detect_on}},
    })


def make_clips(sources: list[Path], n: int, prefix: str):
    from emollama.corpora import Clip

    return [Clip(f"{prefix}{i:04d}_{sources[i % len(sources)].stem}", sources[i % len(sources)])
            for i in range(n)]


def bench_extract(args, sources: list[Path], device: str, work: Path, res: dict) -> None:
    import torch

    from emollama.pipeline.extraction import run_extract

    cuda = device.startswith("cuda")
    progress = sys.stderr.isatty()
    print(f"\n== part 1: extraction, paper-size random encoders on {device} ==")
    build: dict[str, float] = {}
    t = time.perf_counter()
    encs = build_random_encoders(device, args.batch_size, build)
    res["build_s"] = time.perf_counter() - t
    res["build_s_per_view"] = build
    install_encoder_hook(encs)
    del encs

    if args.cpu_smoke:
        cfg = extract_config(sources[0].parent, work / "smoke.zarr", args)
        clips = make_clips(sources[:1], 1, "smoke")
        s = run_extract(cfg, progress=progress, clips=clips)
        res.update(_summary(s, 1))
        from emollama.store import FeatureStore
        st = FeatureStore.open(str(work / "smoke.zarr"))
        shapes = {}
        if s.ok:
            got = st.read(s.ok[0], list(s.keys.values()))
            by_key = {v: k for k, v in s.keys.items()}
            shapes = {by_key[k]: [list(a.shape), str(a.dtype)] for k, a in got.items()}
        res["shapes"] = shapes
        res["peak_rss_gib"] = rss_gib()
        for name, (shape, dt) in shapes.items():
            print(f"  {name:<24} {shape} {dt}")
        return

    if cuda:
        bench_mtcnn(sources, device, res)
    # warm-up (CUDA context, kernels, MTCNN) and calibration, each in its own store
    t = time.perf_counter()
    run_extract(extract_config(sources[0].parent, work / "warm.zarr", args), progress=False,
                clips=make_clips(sources, min(4, args.n), "warm"))
    res["warmup_s"] = time.perf_counter() - t
    t = time.perf_counter()
    cal = run_extract(extract_config(sources[0].parent, work / "cal.zarr", args), progress=False,
                      clips=make_clips(sources, 8, "cal"))
    cal_rate = len(cal.ok) / max(time.perf_counter() - t, 1e-9)
    n = args.n
    if cal_rate > 0 and n > cal_rate * args.extract_budget_s:
        n = max(16, int(cal_rate * args.extract_budget_s))
    res.update(calibration_clips_per_s=cal_rate, n_requested=args.n, n=n)
    print(f"  warm-up {res['warmup_s']:.1f} s; calibration {cal_rate:.2f} clips/s -> {n} clips "
          f"(requested {args.n}, budget {args.extract_budget_s:.0f} s)")

    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    cfg = extract_config(sources[0].parent, work / "store.zarr", args)
    with GpuSampler() as gs:
        s = run_extract(cfg, progress=progress, clips=make_clips(sources, n, "clip"))
    res.update(_summary(s, n))
    enc_s = sum(s.seconds.get(v, 0.0) for v in VIEWS)
    res["encoder_share_of_wall"] = enc_s / max(s.wall, 1e-9)
    res["gpu_busy_nvml_pct"] = gs.mean
    res["gpu_busy_samples"] = len(gs.samples)
    res["nvml_error"] = gs.error
    if cuda:
        res["peak_gpu_alloc_gib"] = torch.cuda.max_memory_allocated() / GiB
        res["peak_gpu_reserved_gib"] = torch.cuda.max_memory_reserved() / GiB
    res["peak_rss_gib"] = rss_gib()
    for line in s.lines():
        print("  " + line)
    if args.compare_budget_s > 0:
        compare_detect_on(args, sources, work, s.detect_on, n, progress, res)


def bench_mtcnn(sources: list[Path], device: str, res: dict, clips: int = 4, per_clip: int = 8, reps: int = 3) -> None:
    """MTCNN alone on the GPU, on the detection frames of a few real clips in one batch (as the encoding
    side sends a face group): facenet-pytorch's ``MTCNN.detect`` (a Python loop over candidate boxes)
    against `extract.mtcnn.detect` (the crops batched), their times and whether their boxes agree."""
    import numpy as np
    import torch

    from emollama.extract import decode, faces, mtcnn

    net = faces.FaceDetector(device=device).mtcnn
    smalls = []
    for path in sources[:clips]:
        info = decode.probe(path)
        idx = np.linspace(0, info.n_frames - 1, per_clip).round().astype(int).tolist()
        smalls.append(faces.detection_frames(decode.read_frames(path, idx, max_side=640, info=info), 640)[0])
    smalls = [x for x in smalls if x.shape[1:] == smalls[0].shape[1:]]
    frames = np.concatenate(smalls)

    def timed(fn) -> tuple[float, tuple]:
        fn(frames)   # warm-up
        sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
        sync()
        t = time.perf_counter()
        for _ in range(reps):
            out = fn(frames)
        sync()
        return (time.perf_counter() - t) / reps, out

    t_loop, (b1, _) = timed(net.detect)
    t_batch, (b2, _) = timed(lambda f: mtcnn.detect(net, f))
    same, diff = 0, 0.0
    for x, y in zip(b1, b2):
        if x is None or y is None:
            same += x is None and y is None
            continue
        x = np.asarray(x, np.float64)
        if x.shape == y.shape:
            same += bool(np.array_equal(x, y))
            diff = max(diff, float(np.abs(x - y).max()))
        else:
            diff = float("inf")
    res["mtcnn"] = {"frames": len(frames), "size": list(frames.shape[1:3]), "loop_s": t_loop, "batched_s": t_batch,
                    "identical_frames": same, "max_box_diff_px": diff}
    print(f"  MTCNN on {len(frames)} detection frames {frames.shape[2]}x{frames.shape[1]}: facenet-pytorch "
          f"{t_loop * 1000:.0f} ms, batched crops {t_batch * 1000:.0f} ms; boxes identical in {same}/{len(frames)} "
          f"frames (max difference {diff:.2g} px)")


def compare_detect_on(args, sources: list[Path], work: Path, ran: str, n: int, progress: bool, res: dict) -> None:
    """The same extraction with faces tracked the other way (detect_on prep <-> encoder), sized by a
    calibration of 8 clips to --compare-budget-s: which placement keeps this machine's GPU busier."""
    from emollama.pipeline.extraction import run_extract

    other = argparse.Namespace(**{**vars(args), "detect_on": "prep" if ran == "encoder" else "encoder"})
    print(f"\n  the same with detect_on = {other.detect_on}:")
    t = time.perf_counter()
    cal = run_extract(extract_config(sources[0].parent, work / "cal-other.zarr", other), progress=False,
                      clips=make_clips(sources, 8, "calo"))
    rate = len(cal.ok) / max(time.perf_counter() - t, 1e-9)
    m = min(n, max(16, int(rate * args.compare_budget_s)))
    o = run_extract(extract_config(sources[0].parent, work / "other.zarr", other), progress=progress,
                    clips=make_clips(sources, m, "other"))
    res["other"] = _summary(o, m)
    for line in o.lines():
        print("  " + line)


def _summary(s, n: int) -> dict:
    return {"ok": len(s.ok), "failed": len(s.failed), "failures": s.failed[:5], "no_face": len(s.no_face),
            "wall_s": s.wall, "clips_per_s": len(s.ok) / max(s.wall, 1e-9), "seconds": dict(s.seconds),
            "executor": s.executor, "prep_workers": s.prep_workers, "batch_clips": s.batch_clips,
            "detect_on": s.detect_on,
            "wait_share_of_wall": s.seconds.get("wait", 0.0) / max(s.wall, 1e-9)}


def free_extract_models() -> None:
    import torch

    import emollama.extract.step as step

    step._MODELS.clear()
    _RANDOM_ENCODERS.clear()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# --------------------------------------------------------------------------------------------
# part 2: training

def make_batch(model, batch: int, vocab: int, device, gen) -> dict:
    """A batch in EmoModel's format: [INST] <video>{256 slots}</video> <feature>{4 slots}</feature>
    text [/INST] answer</s>, ~80 text and ~40 answer tokens per example, right-padded."""
    import torch

    lay = model.layout
    n_video = sum(s.n for s in lay.video)
    n_feat = sum(s.n for s in lay.feature)
    rows = []
    for _ in range(batch):
        text = int(torch.randint(70, 91, (1,), generator=gen))
        ans = int(torch.randint(30, 51, (1,), generator=gen))
        pre, mid = 5, 6                       # "<s>[INST] <video>", "</video> <feature>"
        post = max(1, text - pre - mid)       # "</feature> The person ... [/INST]"
        kinds = [0] * pre + [1] * n_video + [0] * mid + [1] * n_feat + [0] * post + [2] * (ans + 1)
        rows.append(kinds)
    L = max(len(r) for r in rows)
    ids = torch.randint(4, vocab, (batch, L), generator=gen)
    kind = torch.full((batch, L), -1)
    for i, r in enumerate(rows):
        kind[i, :len(r)] = torch.tensor(r)
    attention = kind >= 0
    feat_mask = kind == 1
    ids[~attention] = 0
    ids[feat_mask] = 0                        # slot placeholder id (the pad id)
    labels = torch.where(kind == 2, ids, torch.full_like(ids, -100))
    feats = {}
    specs = list(model.projectors.specs.values())
    for key in dict.fromkeys(p.set_key for p in specs):
        parts = {p.part: p for p in specs if p.set_key == key}
        if "patches" in parts:                # CLS + patch tokens (EVA): [B, 1 + 256 * 4, 1408]
            pt = parts["patches"]
            shape = (batch, 1 + pt.tokens * pt.group, pt.in_features // pt.group)
        else:                                 # one vector per clip: [B, 1024]
            shape = (batch, next(iter(parts.values())).in_features)
        feats[key] = torch.randn(shape, generator=gen)
    b = {"input_ids": ids, "attention_mask": attention.long(), "labels": labels, "feat_mask": feat_mask,
         "features": feats}
    return {k: ({kk: vv.to(device) for kk, vv in v.items()} if isinstance(v, dict) else v.to(device))
            for k, v in b.items()}


def bench_train(args, device: str, res: dict) -> None:
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from emollama.train.config import PAPER_FEATURES, TrainConfig
    from emollama.train.model import EmoModel, Projectors, add_lora, count_parameters, layout_for, projector_specs
    from emollama.train.params import LLAMA2_7B, meta_model, paper_sets
    from emollama.train.tiny import TINY_LLM, TINY_VOCAB

    cuda = device.startswith("cuda")
    tcfg = TrainConfig()
    llm_cfg = dict(LLAMA2_7B) if not args.cpu_smoke else dict(vocab_size=TINY_VOCAB, **TINY_LLM)
    label = "LLaMA-2-7B-shaped" if not args.cpu_smoke else "tiny Llama (smoke)"
    print(f"\n== part 2: training, {label} random LM on {device} ==")
    sets = paper_sets(list(tcfg.data.features or PAPER_FEATURES))
    counts = count_parameters(meta_model(llm_cfg, sets, tcfg))    # the meta device: no memory
    res["params_meta"] = {k: counts[k] for k in ("lora", "llm_all", "projectors_total", "trainable_total",
                                                 "all_params")}
    dtype = torch.bfloat16 if cuda else torch.float32
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    torch.manual_seed(0)
    with torch.device(device):                # random init directly on the GPU, in bf16
        try:
            llm = AutoModelForCausalLM.from_config(LlamaConfig(**llm_cfg), dtype=dtype)
        except TypeError:                     # a transformers that still calls it torch_dtype
            llm = AutoModelForCausalLM.from_config(LlamaConfig(**llm_cfg), torch_dtype=dtype)
    if {p.dtype for p in llm.parameters()} != {dtype}:
        llm = llm.to(dtype)                   # dtype= was not honoured: cast (what from_pretrained(dtype=) gives)
    res["llm_device"] = str(next(llm.parameters()).device)
    for p in llm.parameters():
        p.requires_grad_(False)
    specs = projector_specs(sets, llm.config.hidden_size, tcfg.data.patch_group)
    lc = tcfg.lora
    peft_model = add_lora(llm, lc.r, lc.alpha, lc.dropout, lc.target_modules, lc.bias)
    inner = peft_model.base_model.model       # as train.model.build_model does
    if hasattr(inner, "activation_checkpointing_enable"):
        inner.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        res["checkpointing"] = "activation_checkpointing_enable"
    else:
        inner.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        res["checkpointing"] = "gradient_checkpointing_enable"
    model = EmoModel(peft_model, Projectors(specs), layout_for(specs)).to(device)
    model.train()
    if cuda:
        torch.cuda.synchronize()
    res["build_s"] = time.perf_counter() - t
    counts = count_parameters(model)
    n_all = counts["all_params"]
    res["params"] = {k: counts[k] for k in ("lora", "llm_all", "projectors_total", "trainable_total", "all_params")}
    res["lora_dtype"] = str(next(p for n, p in model.llm.named_parameters() if "lora_A" in n).dtype)
    print(f"  built in {res['build_s']:.1f} s: LM {counts['llm_all'] - counts['lora']:,} frozen + LoRA "
          f"{counts['lora']:,} + projectors {counts['projectors_total']:,}; slots {model.layout.n_tokens}")

    decay = [p for _, p in model.trainable() if p.ndim >= 2]
    no_decay = [p for _, p in model.trainable() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.05}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=1e-4, betas=(0.9, 0.999))
    gen = torch.Generator().manual_seed(0)
    batches = [make_batch(model, args.batch, llm.config.vocab_size, device, gen) for _ in range(4)]
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if cuda else None
    import contextlib

    def step(b) -> float:
        with (autocast() if autocast else contextlib.nullcontext()):
            s, n = model(b)
        loss = s / n
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for _, p in model.trainable()], 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    steps, warm = args.steps, args.warmup_steps
    if args.cpu_smoke:
        steps, warm = 2, 1
    losses = []
    for i in range(warm):
        losses.append(step(batches[i % len(batches)]))
    if cuda:
        torch.cuda.synchronize()
    t = time.perf_counter()
    tokens = padded = samples = 0
    for i in range(steps):
        b = batches[i % len(batches)]
        losses.append(step(b))
        tokens += int(b["attention_mask"].sum())
        padded += b["input_ids"].numel()
        samples += b["input_ids"].shape[0]
    if cuda:
        torch.cuda.synchronize()
    dt = time.perf_counter() - t
    res.update(steps=steps, warmup_steps=warm, batch=args.batch, seconds=dt, step_s=dt / steps,
               samples_per_s=samples / dt, tokens_per_s=tokens / dt, tokens_per_step=tokens / steps,
               padded_len=batches[0]["input_ids"].shape[1], loss_first=losses[0], loss_last=losses[-1],
               feature_slots=model.layout.n_tokens)
    flops = 6.0 * n_all * tokens / dt
    res["model_tflops_per_s"] = flops / 1e12
    if cuda:
        res["peak_gpu_alloc_gib"] = torch.cuda.max_memory_allocated() / GiB
        res["peak_gpu_reserved_gib"] = torch.cuda.max_memory_reserved() / GiB
        peak, why = peak_tflops(torch.cuda.get_device_name(), args.peak_tflops)
        res["peak_tflops"], res["peak_basis"] = peak, why
        res["mfu_pct"] = 100 * flops / (peak * 1e12) if peak else None
    res["peak_rss_gib"] = rss_gib()
    print(f"  {steps} steps in {dt:.2f} s; loss {losses[0]:.3f} -> {losses[-1]:.3f}")
    del model, peft_model, llm, opt, batches
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()


# --------------------------------------------------------------------------------------------
# the summary table

def table(env: dict, ex: dict, tr: dict, smoke: bool) -> list[str]:
    L = []
    add = L.append
    add("=" * 78)
    add(f"bench_gpu {'CPU SMOKE' if smoke else 'summary'}: {env.get('device_name')}  (random weights: speed only)")
    add(f"torch {env.get('torch')}  transformers {env.get('transformers')}  peft {env.get('peft')}  "
        f"timm {env.get('timm')}  python {env.get('python')}")
    add("-" * 78)
    if ex.get("error"):
        add(f"part 1 extraction FAILED: {ex['error']}")
    elif ex:
        src = f"{env.get('n_sources')} real clips"
        if smoke:
            add(f"part 1 extraction (CPU fp32, paper-size random encoders, 1 real clip, in-process, MTCNN "
                f"{'on the encoding side' if ex.get('detect_on') == 'encoder' else 'per clip'}), stored:")
            for name, (shape, dt) in ex.get("shapes", {}).items():
                add(f"  {name:<26} {str(shape):<14} {dt}")
        else:
            add(f"part 1 extraction (fp16, paper-size random encoders, {src} repeated -> {ex.get('n')} ids, "
                "in-process executor):")
        add(f"  clips ok/failed {ex.get('ok')}/{ex.get('failed')}   clips/s {ex.get('clips_per_s', 0):.2f}   "
            f"wall {ex.get('wall_s', 0):.1f} s   no face {ex.get('no_face')}")
        if not smoke:
            busy = ex.get("gpu_busy_nvml_pct")
            add(f"  GPU busy {'%.0f%% (NVML, %d samples)' % (busy, ex['gpu_busy_samples']) if busy is not None else 'n/a (' + str(ex.get('nvml_error')) + ')'}"
                f"   encoders/wall {100 * ex.get('encoder_share_of_wall', 0):.0f}%"
                f"   waiting for prepared clips {100 * ex.get('wait_share_of_wall', 0):.0f}%")
            add(f"  {ex.get('prep_workers')} preparation process(es), {ex.get('batch_clips')} clips per task, "
                f"MTCNN {'per 16 clips on the GPU' if ex.get('detect_on') == 'encoder' else 'per clip on CPU'}")
            add(f"  peak GPU mem {ex.get('peak_gpu_alloc_gib', 0):.1f} GiB alloc / {ex.get('peak_gpu_reserved_gib', 0):.1f} GiB "
                f"reserved   encoders built {ex.get('build_s', 0):.0f} s   warm-up {ex.get('warmup_s', 0):.0f} s")
        else:
            add(f"  peak RSS {ex.get('peak_rss_gib', 0):.1f} GiB   encoders built {ex.get('build_s', 0):.0f} s")
        secs = {k: v for k, v in ex.get("seconds", {}).items() if k != "wait"}
        total = sum(secs.values()) or 1.0
        n = max(ex.get("ok", 0), 1)
        summed = "decode" if ex.get("detect_on") == "encoder" else "decode, faces"
        add(f"  {'stage':<10} {'seconds':>8} {'share':>6} {'s/clip':>7}   ({summed}: summed over the preparation processes)")
        for stage, sec in sorted(secs.items(), key=lambda kv: -kv[1]):
            add(f"  {stage:<10} {sec:8.2f} {100 * sec / total:5.0f}% {sec / n:7.3f}")
        for cid, why in ex.get("failures", [])[:3]:
            add(f"  FAILED {cid}: {why[:60]}")
        m = ex.get("mtcnn")
        if m:
            add(f"  MTCNN alone, {m['frames']} frames in one call: facenet-pytorch {m['loop_s'] * 1000:.0f} ms, "
                f"batched crops {m['batched_s'] * 1000:.0f} ms ({m['loop_s'] / max(m['batched_s'], 1e-9):.1f}x); "
                f"same boxes {m['identical_frames']}/{m['frames']}")
        other = ex.get("other")
        if other:
            add(f"  the same with detect_on = {other['detect_on']}: {other['clips_per_s']:.2f} clips/s over "
                f"{other['ok']} ids, waiting for prepared clips {100 * other['wait_share_of_wall']:.0f}%")
    add("-" * 78)
    if tr.get("error"):
        add(f"part 2 training FAILED: {tr['error']}")
    elif tr:
        p = tr["params"]
        add(f"part 2 training ({'tiny Llama, CPU fp32' if smoke else 'LLaMA-2-7B shape, bf16 autocast'}, LoRA r64/a16 q,v, "
            f"4 projectors, grad ckpt):")
        add(f"  params {p['all_params']:,} all; trainable: LoRA {p['lora']:,} ({tr['lora_dtype'].removeprefix('torch.')})"
            f" + projectors {p['projectors_total']:,}")
        add(f"  batch {tr['batch']} x {tr['padded_len']} padded ({tr['feature_slots']} feature slots), "
            f"{tr['tokens_per_step']:.0f} non-pad tokens/step; {tr['steps']} steps after {tr['warmup_steps']} warm-up")
        add(f"  step {tr['step_s'] * 1000:.0f} ms   samples/s {tr['samples_per_s']:.2f}   tokens/s {tr['tokens_per_s']:,.0f}"
            f"   loss {tr['loss_first']:.2f} -> {tr['loss_last']:.2f}")
        if not smoke:
            mfu = tr.get("mfu_pct")
            add(f"  peak GPU mem {tr.get('peak_gpu_alloc_gib', 0):.1f} GiB alloc / {tr.get('peak_gpu_reserved_gib', 0):.1f} GiB"
                f" reserved   LM built {tr['build_s']:.0f} s")
            add(f"  MFU {('%.1f%%' % mfu) if mfu is not None else 'n/a'}  = 6*N*T/step / peak: {tr['model_tflops_per_s']:.0f} "
                f"TFLOP/s of {tr.get('peak_tflops')} ({tr.get('peak_basis')})")
            add("      N = all params (frozen LM + LoRA + projectors), T = non-pad tokens, attention FLOPs excluded")
        else:
            add(f"  peak RSS {tr.get('peak_rss_gib', 0):.1f} GiB   model FLOPs 6*N*T: {tr['model_tflops_per_s'] * 1000:.1f} GFLOP/s")
    add("-" * 78)
    add(f"total wall {env.get('wall_s', 0):.0f} s   peak RSS {env.get('peak_rss_gib', 0):.1f} GiB")
    add("=" * 78)
    return L


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clips", type=Path, default=None,
                    help="folder of real clips (default .bench/clips, else ../shared/samples/mer2023-examples)")
    ap.add_argument("--n", type=int, default=300, help="clip ids in the timed extraction (the clips repeated)")
    ap.add_argument("--extract-budget-s", type=float, default=180.0,
                    help="cap --n so the timed extraction takes about this long (from the calibration run)")
    ap.add_argument("--micro-batch", type=int, default=4, help="clips encoded together (project default 4)")
    ap.add_argument("--batch-clips", type=int, default=None,
                    help="clips per task / store commit (default: 4 per preparation process, at least 8)")
    ap.add_argument("--batch-size", type=int, default=32, help="images per encoder forward (default 32)")
    ap.add_argument("--steps", type=int, default=20, help="timed training steps")
    ap.add_argument("--warmup-steps", type=int, default=3)
    ap.add_argument("--batch", type=int, default=4, help="training batch size")
    ap.add_argument("--peak-tflops", type=float, default=None, help="the card's dense bf16 peak, for MFU")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--detect-on", default="auto", choices=("auto", "prep", "encoder"),
                    help="where MTCNN runs (auto: 16 clips at a time on the GPU when there is one, else per clip)")
    ap.add_argument("--compare-budget-s", type=float, default=45.0,
                    help="then extract with faces tracked the other way for about this long (0: skip)")
    ap.add_argument("--cpu-smoke", action="store_true", help="one clip and a tiny LM on the CPU (automatic without CUDA)")
    ap.add_argument("--skip-extract", action="store_true")
    ap.add_argument("--skip-train", action="store_true")
    ap.add_argument("--check-imports", action="store_true", help="only check the imports, then exit")
    ap.add_argument("--out", default=os.environ.get("OUT") or None, help="write bench_gpu.txt/.json here (default $OUT)")
    args = ap.parse_args()

    t0 = time.perf_counter()
    missing = check_imports(verbose=True)
    if args.check_imports or missing:
        return 2 if missing else 0

    import torch

    cuda = torch.cuda.is_available() and args.device in ("auto", "cuda") or args.device.startswith("cuda:")
    if not cuda and not args.cpu_smoke:
        print("no CUDA device: running the CPU smoke test instead (--cpu-smoke)")
        args.cpu_smoke = True
    device = ("cuda" if args.device == "auto" else args.device) if cuda and not args.cpu_smoke else "cpu"
    if args.device == "auto":
        args.device = device
    try:
        import transformers.utils.logging as tlog
        tlog.disable_progress_bar()
    except Exception:  # noqa: BLE001
        pass

    clips_dir = args.clips
    if clips_dir is None:
        for cand in (REPO / ".bench" / "clips", REPO.parent / "shared" / "samples" / "mer2023-examples"):
            if cand.is_dir():
                clips_dir = cand
                break
    sources = sorted(Path(clips_dir).glob("*.mp4")) if clips_dir else []
    env = {"python": sys.version.split()[0], "torch": torch.__version__, "device": device,
           "device_name": torch.cuda.get_device_name() if device.startswith("cuda") else "CPU "
           f"({os.cpu_count()} cores, torch threads {torch.get_num_threads()})",
           "n_sources": len(sources), "clips_dir": str(clips_dir)}
    for dist in ("transformers", "peft", "timm", "zarr", "av", "numpy"):
        env[dist] = _version(dist)
    print(f"\ndevice {env['device_name']}; clips {len(sources)} from {clips_dir}")

    ex: dict = {}
    tr: dict = {}
    with tempfile.TemporaryDirectory(prefix="emollama-bench-gpu-", dir="/tmp") as tmp:
        if not args.skip_extract:
            if not sources:
                ex["error"] = f"no .mp4 clips in {clips_dir}: run `make gpu-wheels` (copies them into .bench/clips)"
            else:
                try:
                    bench_extract(args, sources, device, Path(tmp), ex)
                except Exception as e:  # noqa: BLE001 - report it, then go on with part 2
                    traceback.print_exc()
                    ex["error"] = f"{type(e).__name__}: {str(e)[:200]}"
                free_extract_models()
        if not args.skip_train:
            try:
                bench_train(args, device, tr)
            except Exception as e:  # noqa: BLE001
                traceback.print_exc()
                tr["error"] = f"{type(e).__name__}: {str(e)[:200]}"
    env["wall_s"] = time.perf_counter() - t0
    env["peak_rss_gib"] = rss_gib()
    lines = table(env, ex, tr, args.cpu_smoke)
    print("\n" + "\n".join(lines))
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        name = "bench_gpu_cpu_smoke" if args.cpu_smoke else "bench_gpu"
        (out / f"{name}.txt").write_text("\n".join(lines) + "\n")
        (out / f"{name}.json").write_text(json.dumps({"env": env, "extract": ex, "train": tr, "args": {
            k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}}, indent=2, default=str) + "\n")
        print(f"written: {out / (name + '.txt')}, {out / (name + '.json')}")
    return 1 if ex.get("error") or tr.get("error") or ex.get("failed") else 0


if __name__ == "__main__":
    sys.exit(main())
