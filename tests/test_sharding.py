"""Tensor and data parallel serving on simulated CPU devices (8, in a subprocess: see tests/sharded_check.py):
greedy tokens identical to one device, and the parameters really sharded (per-device shapes)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from models.sharding import check_tensor_parallel, kv_cache_spec, param_specs
from tests.tiny_models import tiny_config

HERE = os.path.dirname(os.path.abspath(__file__))


def sharded_run(case: str) -> dict:
    proc = subprocess.run([sys.executable, os.path.join(HERE, "sharded_check.py"), case], capture_output=True,
                          text=True, timeout=900)  # fmt: skip
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    return json.loads(lines[-1][len("RESULT ") :])


def test_tiny_model_tp_2_4_8_and_dp2_tp4_match_one_device():
    r = sharded_run("tiny")
    c = r["config"]
    base = r["1x1"]["tokens"]
    for key in ("1x2", "1x4", "1x8", "2x4"):
        assert r[key]["tokens"] == base, key
    for key, tp in (("1x2", 2), ("1x4", 4), ("1x8", 8), ("2x4", 4)):
        lay = r[key]["layout"]
        assert len(lay["devices"]) == tp
        assert lay["wq"] == [c["layers"], c["hidden"], c["heads"] * c["head_dim"] // tp]  # heads split
        assert lay["wo"] == [c["layers"], c["heads"] * c["head_dim"] // tp, c["hidden"]]
        assert lay["w_down"] == [c["layers"], c["mlp"] // tp, c["hidden"]]
        assert lay["embed"] == [c["vocab"] // tp, c["hidden"]]  # vocab split
        kv_local = c["kv_heads"] // tp if c["kv_heads"] % tp == 0 else c["kv_heads"]  # 8 > 4 KV heads: replicated
        assert lay["wk"][-1] == kv_local * c["head_dim"] and lay["kv"][3] == kv_local
        assert "'model'" in lay["wq_spec"]
    assert r["2x4"]["layout"]["replicas"] == 2
    # The servers' Frontend over 2 replicas x 2 devices: the same tokens; metrics sum the replicas' pages.
    assert r["served"]["tokens"] == base[0]
    pages = r["served"]["replica_pages"]
    assert len(pages) == 2 and r["served"]["metrics"] == [f"jaxserve_kv_pages_total {float(sum(pages))}"]
    assert r["1x1"]["layout"]["wq"] == [c["layers"], c["hidden"], c["heads"] * c["head_dim"]]


@pytest.mark.real_model
def test_real_model_tp3_and_dp2_tp3_match_one_device():
    r = sharded_run("real")
    assert "Paris" in r["first_text"]
    assert r["1x3"]["tokens"] == r["1x1"]["tokens"]
    assert r["2x3"]["tokens"] == r["1x1"]["tokens"]
    for key in ("1x3", "2x3"):
        lay = r[key]["layout"]
        # SmolLM2: 30 layers, hidden 576, 9 query heads / 3 KV heads of 64, MLP 1536, vocab 49152 -> thirds
        assert lay["wq"] == [30, 576, 192] and lay["wk"] == [30, 576, 64] and lay["wo"] == [30, 192, 576]
        assert lay["w_down"] == [30, 512, 576] and lay["embed"] == [16384, 576] and lay["kv"][3] == 1
    assert r["2x3"]["layout"]["replicas"] == 2


def test_sizes_that_do_not_split_the_heads_are_refused():
    cfg = tiny_config(num_heads=4, num_kv_heads=2)
    for tp in (1, 2, 4):
        check_tensor_parallel(cfg, tp)
    for tp in (3, 8, 0):
        with pytest.raises(ValueError, match="tensor_parallel_size"):
            check_tensor_parallel(cfg, tp)
    smol = tiny_config(num_heads=9, num_kv_heads=3, name="smol")
    with pytest.raises(ValueError, match=r"one of \[1, 3, 9\]"):
        check_tensor_parallel(smol, 2)


def test_sharding_rules():
    cfg = tiny_config(num_heads=8, num_kv_heads=2, vocab_size=262)
    specs = param_specs(cfg, 4)
    assert tuple(specs.layers.wq) == (None, None, "model") and tuple(specs.layers.wo) == (None, "model", None)
    assert tuple(specs.layers.wk) == ()  # 2 KV heads over 4 devices: replicated
    assert tuple(specs.embed) == ()  # 262 does not split over 4: replicated, not padded
    assert tuple(kv_cache_spec(cfg, 4)) == () and tuple(kv_cache_spec(cfg, 2)) == (None, None, None, "model", None)
