"""The parts install as `emollama.*`: a user's own train.py or store/ in the working folder shadows nothing."""

from __future__ import annotations

import subprocess
import sys


def test_imports_work_from_a_folder_with_its_own_train_py_and_store(tmp_path):
    (tmp_path / "train.py").write_text("MINE = 'the user train.py'\n")
    (tmp_path / "store").mkdir()
    (tmp_path / "store" / "__init__.py").write_text("MINE = 'the user store/'\n")
    code = ("import train, store\n"
            "from emollama.train.run import load_run\n"
            "from emollama.store import FeatureStore\n"
            "from emollama.pipeline.cli import app\n"
            "import emollama.extract.step, emollama.corpora\n"
            "print(train.MINE, '|', store.MINE, '|', load_run.__module__, FeatureStore.__module__)\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == ("the user train.py | the user store/ | emollama.train.run "
                                  "emollama.store.store")

