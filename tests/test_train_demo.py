"""python -m vlfast.train (the attention demo until the training stack lands)."""
from __future__ import annotations

import subprocess
import sys

from vlfast.training import demo


def test_demo_learns_and_varlen_matches_padded():
    res = demo.run(demo.DemoConfig(steps=120, batch=32), quiet=True)
    assert res["final_loss"] < 0.5 * res["first_loss"]
    assert res["accuracy"] > 4 * res["chance"]
    assert res["varlen_vs_padded_max_diff"] < 1e-4
    assert res["co_attention_max_diff"] < 1e-5


def test_train_entry_point_runs():
    p = subprocess.run([sys.executable, "-P", "-m", "vlfast.train", "--demo", "--steps", "3"], capture_output=True, text=True,
                       timeout=300)
    assert "first_loss" in p.stdout and "accuracy" in p.stdout, p.stdout + p.stderr
    bad = subprocess.run([sys.executable, "-P", "-m", "vlfast.train", "--demo", "--steps", "0"], capture_output=True,
                         text=True, timeout=300)
    assert bad.returncode == 2 and "--steps: expected an int >= 1, got 0" in bad.stderr
