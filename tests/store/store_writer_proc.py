"""Subprocess writer for the concurrency and crash tests.

usage: python store_writer_proc.py STORE FIRST LAST BATCH [SLEEP_S]
Writes clips c{FIRST}..c{LAST-1} into UTT and FRAMES, BATCH clips per commit, skipping complete ones.
Prints "committed N" after every commit (flushes), so a parent can kill it mid-run.
"""

import sys
import time
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[2])]

from emollama.store import FeatureStore  # noqa: E402
from store_helpers import FRAMES, UTT, value  # noqa: E402


def main() -> None:
    url, first, last, batch = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    sleep_s = float(sys.argv[5]) if len(sys.argv) > 5 else 0.0
    st = FeatureStore.open(url)
    ku, kf = st.ensure_set(UTT), st.ensure_set(FRAMES)
    done = st.complete(ku) & st.complete(kf)
    n = 0
    with st.writer() as w:
        for i in range(first, last):
            clip = f"c{i:04d}"
            if clip in done:
                continue
            w.add(clip, {ku: value(clip, UTT), kf: value(clip, FRAMES)}, {"source": f"/videos/{clip}.mp4"})
            if w.pending >= batch:
                w.commit()
                n += 1
                print(f"committed {n}", flush=True)
                time.sleep(sleep_s)
    print("done", flush=True)


if __name__ == "__main__":
    main()
