"""Domain restriction and per-domain pruning on a real 2-rank desmoe run (gloo, fp32 CPU, AutoEP ep_size 2).

One short run, then: ``desmoe export`` (full) and ``desmoe export --domain math --prune``; the pruned
directory loads with transformers alone (a process that never imports desmoe) strictly, with one
expert count in every layer; the pruned model restricted to math computes the restricted full model's
logits; ``desmoe eval --restrict-to-domains`` writes both numbers per domain; the same with ``--coverage``
(the serving selection), in files of its own; bad input exits 2.
"""

import json
import os
import subprocess
import sys

import pytest
import torch
import yaml

import desmoe
from desmoe import restrict
from desmoe.cli import main as desmoe_cli
from tests.integration.launch import ROOT, desmoe as desmoe_process, run_env
from tests.integration.test_export import DEMO, SMALL, TOL

pytestmark = pytest.mark.integration

PLAIN_LOAD = """
import json, sys
from transformers import AutoModelForCausalLM
model, info = AutoModelForCausalLM.from_pretrained(sys.argv[1], output_loading_info=True)
assert not any(k.startswith("desmoe") for k in sys.modules), "desmoe was imported"
print(json.dumps({"info": {k: list(v) for k, v in info.items()}, "experts": model.config.num_experts,
                  "top_k": model.config.num_experts_per_tok}))
"""


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def test_restricted_and_pruned_exports_of_a_real_run(tmp_path, capsys):
    run = tmp_path / "run"
    proc = desmoe_process("train", "--config", DEMO, "--nproc", "2", "--output-dir", str(run), *SMALL,
                          "method.mode=desmoe", "parallel.ep_size=2", "eval.max_pairs=2", "eval.max_new_tokens=4")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    full, pruned = str(tmp_path / "full"), str(tmp_path / "math")
    assert desmoe_cli(["export", str(run), "--out", full]) == 0
    assert desmoe_cli(["export", str(run), "--out", pruned, "--domain", "math", "--prune"]) == 0
    assert "pruned for domain math" in capsys.readouterr().out
    meta = json.load(open(os.path.join(pruned, "desmoe_export.json")))["pruned"]
    k = meta["num_experts"]
    assert meta["domain"] == "math" and meta["original_num_experts"] == 8 and 2 <= k <= 8
    assert all(len(ids) == k and ids == sorted(ids) for ids in meta["kept"].values())
    experts = json.load(open(os.path.join(full, "domain_experts.json")))
    assert experts["domains"] == ["math", "code", "law"] and experts["mode"] == "desmoe"
    for li, ids in enumerate(experts["allowed"]["math"]):  # kept covers allowed
        assert set(ids) <= set(meta["kept"][experts["moe_modules"][li]])

    loaded = subprocess.run([sys.executable, "-c", PLAIN_LOAD, pruned], env=run_env(), cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert loaded.returncode == 0, loaded.stderr[-3000:]
    plain = json.loads(loaded.stdout.strip().splitlines()[-1])
    assert not any(plain["info"].values()) and plain["experts"] == k and plain["top_k"] == 2

    ids = torch.tensor([[1, 40, 80, 120, 33, 70, 99, 2], [1, 101, 111, 104, 32, 43, 44, 2]])
    restricted = _logits(desmoe.load_pretrained(full, domain="math"), ids)
    assert (_logits(desmoe.load_pretrained(pruned, domain="math"), ids) - restricted).abs().max().item() <= TOL
    if all(len(a) == k for a in experts["allowed"]["math"]):  # kept == allowed: the pruned model as it is
        assert (_logits(desmoe.load_pretrained(pruned), ids) - restricted).abs().max().item() <= TOL

    assert desmoe_cli(["eval", str(run), "--restrict-to-domains"]) == 0
    assert "restricted to its own experts" in capsys.readouterr().out
    rec = json.load(open(run / "eval_step10_restricted.json"))
    assert list(rec["domains"]) == ["math", "code", "law"]
    unrestricted = json.load(open(run / "eval_step10.json"))["results"]
    for d, both in rec["domains"].items():
        assert both["unrestricted"] == unrestricted[d]
        assert both["restricted"]["loss"] > 0 and "token_accuracy" in both["restricted"]

    # the serving selection: each layer's experts holding 0.9 of math's affinity, topped up
    cov = str(tmp_path / "math_cov")
    assert desmoe_cli(["export", str(run), "--out", cov, "--domain", "math", "--prune", "--coverage", "0.9"]) == 0
    assert "pruned for domain math (coverage 0.9)" in capsys.readouterr().out
    meta = json.load(open(os.path.join(cov, "desmoe_export.json")))["pruned"]
    k = meta["num_experts"]
    assert meta["coverage"] == 0.9 and all(len(ids) == k for ids in meta["kept"].values())
    allowed = restrict.with_coverage(experts, 0.9)["allowed"]["math"]
    assert all(set(a) <= set(meta["kept"][m]) for a, m in zip(allowed, experts["moe_modules"]))
    assert json.load(open(os.path.join(cov, "domain_experts.json")))["coverage"] == 0.9
    restricted = _logits(desmoe.load_pretrained(full, domain="math", coverage=0.9), ids)
    assert (_logits(desmoe.load_pretrained(cov, domain="math"), ids) - restricted).abs().max().item() <= TOL
    assert desmoe_cli(["eval", str(run), "--restrict-to-domains", "--coverage", "0.9"]) == 0
    assert "restricted to its own experts (coverage 0.9)" in capsys.readouterr().out
    cov_rec = json.load(open(run / "eval_step10_restricted_cov0.9.json"))
    assert cov_rec["selection"]["coverage"] == 0.9 and list(cov_rec["domains"]) == ["math", "code", "law"]
    assert cov_rec["allowed"]["math"] == allowed
    assert json.load(open(run / "eval_step10_restricted.json")) == rec  # the training selection's, untouched

    # bad input: one line each, exit 2
    bad = desmoe_process("export", str(run), "--out", str(tmp_path / "x"), "--domain", "history", "--prune")
    assert bad.returncode == 2 and "Traceback" not in bad.stderr, bad.stderr[-3000:]
    assert "'history' is not one of the run's domains" in bad.stderr and "math, code, law" in bad.stderr
    fft = tmp_path / "fft"
    fft.mkdir()
    cfg = yaml.safe_load(open(run / "config.yaml"))
    cfg["method"]["mode"] = "fft"
    (fft / "config.yaml").write_text(yaml.safe_dump(cfg))
    for argv in (["export", str(fft), "--out", str(tmp_path / "x"), "--domain", "math", "--prune"],
                 ["eval", str(fft), "--restrict-to-domains"]):
        capsys.readouterr()
        assert desmoe_cli(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("desmoe: error:") and "method.mode fft" in err and "esft_token" in err, err
    assert not (tmp_path / "x").exists()
