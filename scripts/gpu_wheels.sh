#!/usr/bin/env bash
# Prepare what `make bench-gpu` needs on a bare, offline GPU machine (`make gpu-wheels`).
#
# The GPU image (Python 3.12, x86-64) already has torch, transformers, peft, timm, safetensors, h5py,
# typer, tqdm, xarray, fsspec, numpy, pillow, scikit-learn, matplotlib, tensorboard, huggingface_hub,
# pyyaml, packaging and typing-extensions (see /work/.library/device/KINDS.md, "Python packages
# already there"). Of the project's dependency closure, the benchmark's import path lacks only:
#
#   zarr, numcodecs, donfig, google-crc32c   the feature store (store/)
#   av                                       PyAV, video/audio decoding (extract/decode.py)
#   facenet-pytorch                          MTCNN face detection; its weights ship in the wheel
#
# dask/distributed/bokeh (and tblib, zict, partd, locket, tornado, ...) are also missing there, but the
# benchmark runs the in-process executor (workers = 0), which never imports them: they are left out
# to keep the carried tree small (PyAV alone is ~40 MB).
#
# This script downloads cp312 manylinux x86-64 wheels of exactly those packages, with the versions
# this project's .venv resolves from pyproject.toml, into .whl/, and copies the ten real sample clips
# of ../shared/samples/mer2023-examples into .bench/clips/. Both folders are git-ignored: name them
# in the remote tool's `carry` (".whl", ".bench"). Nothing is downloaded on the GPU machine.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PY:-python3}
WHL=.whl
CLIPS=.bench/clips
SAMPLES=${SAMPLES:-../shared/samples/mer2023-examples}

# name==version, compatible with pyproject.toml (zarr>=3.1,<4; numcodecs>=0.15; google-crc32c>=1.5;
# av>=14) and with each other (zarr 3.1.6 needs donfig>=0.8, google-crc32c>=1.5, numcodecs>=0.14,
# numpy>=2, packaging>=22, typing-extensions>=4.12; numcodecs needs numpy, typing_extensions;
# donfig needs pyyaml: numpy, packaging, typing-extensions, pyyaml are in the image).
PINS=(
  zarr==3.1.6
  numcodecs==0.16.6
  donfig==0.8.1.post1
  google-crc32c==1.9.0
  av==18.1.0
  facenet-pytorch==2.6.0
)

mkdir -p "$WHL"
# keep exactly one version per package: stale wheels of other versions would break the install
for f in "$WHL"/*.whl; do
  [ -e "$f" ] || continue
  keep=0
  for pin in "${PINS[@]}"; do
    name=${pin%%==*}; ver=${pin##*==}
    norm=$(echo "$name" | tr '-' '_')
    case "$(basename "$f")" in "$norm-$ver-"*) keep=1 ;; esac
  done
  if [ $keep = 0 ]; then echo "removing stale $f"; rm -f "$f"; fi
done

for pin in "${PINS[@]}"; do
  name=${pin%%==*}; ver=${pin##*==}
  norm=$(echo "$name" | tr '-' '_')
  if compgen -G "$WHL/$norm-$ver-*.whl" >/dev/null; then
    echo "have $pin"
    continue
  fi
  # PIP_CONSTRAINT is cleared: this machine's torch cap has nothing to say about these wheels
  PIP_CONSTRAINT= "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$WHL" "$pin" \
    2> >(grep -v "^WARNING: Location 'file://" >&2)
  echo "got  $pin"
done

if [ -d "$SAMPLES" ]; then
  mkdir -p "$CLIPS"
  n=0
  for f in "$SAMPLES"/*.mp4; do
    cp -f "$f" "$CLIPS/"
    chmod u+w "$CLIPS/$(basename "$f")"
    n=$((n + 1))
  done
  echo "copied $n sample clips into $CLIPS"
else
  echo "WARNING: $SAMPLES not found: no clips in $CLIPS (bench-gpu needs --clips DIR with .mp4 files)" >&2
fi

echo
ls -l "$WHL"
total=$(du -scb "$WHL" .bench 2>/dev/null | tail -1 | cut -f1)
echo "carried folders: .whl $(du -sh "$WHL" | cut -f1), .bench $(du -sh .bench 2>/dev/null | cut -f1) -> total $((total / 1048576)) MiB"
if [ "$total" -gt $((60 * 1048576)) ]; then
  echo "WARNING: over 60 MiB; the remote tool carries at most 64 MiB with the working tree" >&2
fi
echo "remote run: carry [\".whl\", \".bench\"] and run: make bench-gpu"
