"""Domain-restricted routing and per-domain pruned exports (desmoe.restrict), on every family's tiny model.

Runs are tests/unit/test_export.py's checkpoints laid out as DeepSpeed writes them, plus the selection
file the run's mode writes (an affinity record, or esft_selection.json). The real 2-rank run is
tests/integration/test_prune.py.
"""

import dataclasses
import json
import os

import pytest
import torch

from desmoe import dist
from desmoe.models import FAMILIES, build_tiny_model, moe_layer_indices

dist.setup_env()

from desmoe import restrict  # noqa: E402
from desmoe.cli import main as cli_main  # noqa: E402
from desmoe.export import EXPORT_META, ExportError, export_run, load_pretrained  # noqa: E402
from desmoe.restrict import DOMAIN_EXPERTS_FILE, DomainError  # noqa: E402
from tests.unit.test_export import IDS, load_plain, make_run  # noqa: E402

TOL = 1e-5
DOMAINS = ["math", "code"]


def _perturbed(model_type, seed=3):
    """A tiny model with random (non-initial) weights; DeepSeek-V3's choice bias made large on odd experts,
    so a restriction that forgot to mask it would pick them."""
    model = build_tiny_model({"model_type": model_type}, seed=1234).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
        for n, b in model.named_buffers():
            if "e_score_correction_bias" in n:
                b.copy_(torch.tensor([0.0, 5.0] * (b.numel() // 2)))
    return model


def _routing(model, ids):
    """The router outputs of one forward of ``ids``: {layer: [(logits, weights, indices)]}."""
    seen, handles = {}, []
    for i, r in restrict.routers(model).items():
        handles.append(r.register_forward_hook(lambda mod, a, out, i=i: seen.setdefault(i, []).append(out)))
    out = _logits(model, ids)
    for h in handles:
        h.remove()
    return seen, out


def _logits(model, ids=IDS):
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def _allowed_sets(model, seed=0):
    """Per MoE layer a random allowed set that satisfies the routing's minimum (ALLOWED_RULE)."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for i, r in restrict.routers(model).items():
        geo = restrict.routing_geometry(r)
        scores = torch.rand(geo["num_experts"], generator=gen).tolist()
        g = geo["grouping"]
        out[i] = restrict.top_up([], scores, need=geo["top_k"] + 1, grouping=g, per_group=g["per_group"] if g else 0)
    return out


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_restricted_routers_choose_only_allowed_experts(model_type):
    model = _perturbed(model_type)
    ids = torch.randint(3, 500, (3, 24), generator=torch.Generator().manual_seed(5))
    free, _ = _routing(model, ids)
    allowed = _allowed_sets(model)
    restrict.restrict(model, allowed)
    seen, out = _routing(model, ids)
    assert torch.isfinite(out).all()
    chose_masked_before = False
    for i, outs in seen.items():
        for logits, weights, idx in outs:
            assert set(idx.flatten().tolist()) <= set(allowed[i]), (i, allowed[i])
            assert torch.isfinite(weights).all() and not torch.isnan(logits).any()
        chose_masked_before |= not set(free[i][-1][2].flatten().tolist()) <= set(allowed[i])
    assert chose_masked_before  # the restriction changed something
    restrict.restrict(model, None)  # lifted: the stock routing again
    again, _ = _routing(model, ids)
    for i in again:
        assert torch.equal(again[i][-1][2], free[i][-1][2])


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_restricted_to_every_expert_is_the_unrestricted_model(model_type):
    model = _perturbed(model_type)
    want = _logits(model)
    restrict.restrict(model, {i: list(range(r.weight.shape[0])) for i, r in restrict.routers(model).items()})
    assert torch.equal(_logits(model), want)


# ---- runs with a selection --------------------------------------------------------------------


def _add_selection(run_dir, ref, selected, *, step=5, esft=False):
    """Write the selection file of the run: ``selected`` {domain: [[ids] per MoE layer]}; affinity scores
    rank the selected experts first, then the rest by descending id."""
    layers = moe_layer_indices(ref.config)
    n = restrict.routers(ref)[layers[0]].weight.shape[0]
    scores = [[[1.0 - 0.01 * e if e in selected[d][li] else 0.001 * e for e in range(n)] for d in DOMAINS]
              for li in range(len(layers))]
    if esft:
        with open(os.path.join(run_dir, "esft_selection.json"), "w") as f:
            json.dump({"mode": "esft_gate", "domains": DOMAINS, "layers": layers, "scores": scores,
                       "selected": selected}, f)
        return
    os.makedirs(os.path.join(run_dir, "affinity"), exist_ok=True)
    masks = [[[int(e in selected[d][li]) for e in range(n)] for d in DOMAINS] for li in range(len(layers))]
    with open(os.path.join(run_dir, "affinity", f"step{step:06d}.json"), "w") as f:
        json.dump({"step": step, "domains": DOMAINS, "layers": layers, "affinity": scores, "masks": masks}, f)


def _selection(model_type):
    """A selection whose allowed sets need no top-up and have one count in every layer (kept == allowed):
    3 experts per layer, or under DeepSeek-V3's group limit (2 groups of 4, topk_group 1) 2 per group."""
    if model_type == "deepseek_v3":
        return {"math": [[0, 2, 5, 7], [1, 3, 4, 6]], "code": [[1, 2, 4, 5], [0, 3, 6, 7]]}
    return {"math": [[0, 3, 6], [2, 5, 7]], "code": [[1, 2, 4], [0, 6, 7]]}


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_pruned_stock_model_is_the_restricted_full_model_when_kept_is_allowed(tmp_path, model_type):
    run_dir, ref = make_run(tmp_path, model_type, mode="desmoe_no_alr")
    sel = _selection(model_type)
    _add_selection(run_dir, ref, sel)
    full = str(tmp_path / "full")
    meta = export_run(run_dir, full)
    assert meta["domain_experts"] == DOMAIN_EXPERTS_FILE and meta["pruned"] is None
    content = json.load(open(os.path.join(full, DOMAIN_EXPERTS_FILE)))
    assert content["allowed"] == sel and content["domains"] == DOMAINS
    layers = moe_layer_indices(ref.config)
    assert content["layers"] == layers
    for d in DOMAINS:
        out = str(tmp_path / f"pruned_{d}")
        meta = export_run(run_dir, out, domain=d, prune=True)
        k = len(sel[d][0])
        assert meta["pruned"]["num_experts"] == k and meta["pruned"]["original_num_experts"] == 8
        assert list(meta["pruned"]["kept"].values()) == sel[d]
        assert meta["pruned"]["parameters"] < meta["pruned"]["original_parameters"]
        plain = load_plain(out)  # transformers alone, strictly
        for r in restrict.routers(plain).values():
            assert r.weight.shape[0] == k and r.top_k == 2
        restricted = load_pretrained(full, domain=d)
        assert (_logits(plain) - _logits(restricted)).abs().max().item() <= TOL, d
        # the unrestricted full model differs: the restriction matters
        assert (_logits(load_pretrained(full)) - _logits(restricted)).abs().max().item() > 1e-4
        # the pruned export restricted to its own domain: nothing left to mask
        assert torch.equal(_logits(load_pretrained(out, domain=d)), _logits(plain))


def test_pruned_with_adaptive_routers_and_kept_covering_allowed(tmp_path):
    run_dir, ref = make_run(tmp_path, "qwen3_moe", mode="desmoe")
    # math: 2 experts in layer 0, 4 in layer 1 -> K = 4, layer 0 topped up with its next most affine
    sel = {"math": [[1, 6], [0, 2, 5, 7]], "code": [[3], [0, 1, 2, 3, 4]]}
    _add_selection(run_dir, ref, sel)
    full = str(tmp_path / "full")
    export_run(run_dir, full)
    content = json.load(open(os.path.join(full, DOMAIN_EXPERTS_FILE)))
    assert content["selected"] == sel
    assert content["allowed"]["code"][0] == [3, 7]  # topped up to top_k 2 by affinity (0.001 * e: 7 first)
    out = str(tmp_path / "pruned")
    meta = export_run(run_dir, out, domain="math", prune=True)
    assert meta["pruned"]["kept"] == {"model.layers.0.mlp": [1, 5, 6, 7], "model.layers.1.mlp": [0, 2, 5, 7]}
    assert meta["adaptive_routers"]["num_experts"] == 4
    pruned_sel = json.load(open(os.path.join(out, DOMAIN_EXPERTS_FILE)))
    assert pruned_sel["domains"] == ["math"] and pruned_sel["allowed"]["math"] == [[0, 2], [0, 1, 2, 3]]
    restricted_full = _logits(load_pretrained(full, domain="math"))
    assert (_logits(load_pretrained(out, domain="math")) - restricted_full).abs().max().item() <= TOL
    # unrestricted, the pruned model routes among all 4 kept experts of layer 0: not the restricted model
    assert (_logits(load_pretrained(out)) - restricted_full).abs().max().item() > 1e-4
    # the ALR hook and the mask compose: the residual decides within the allowed set
    model = load_pretrained(full, domain="math")
    gate, alr = model.model.layers[0].mlp.gate, model.model.layers[0].adaptive_router
    with torch.no_grad():
        alr.w2.zero_()
        alr.b2.fill_(-30.0)[[0, 6]] = 30.0  # expert 0 is not allowed for math in layer 0
        _, w, idx = gate(torch.randn(5, ref.config.hidden_size))
    assert (idx == 6).any(dim=-1).all() and set(idx.flatten().tolist()) <= {1, 6}


def test_esft_selection_and_checkpoint_step(tmp_path):
    run_dir, ref = make_run(tmp_path, "olmoe", mode="esft_gate")
    sel = _selection("olmoe")
    _add_selection(run_dir, ref, sel, esft=True)
    out = str(tmp_path / "e")
    export_run(run_dir, out)
    assert json.load(open(os.path.join(out, DOMAIN_EXPERTS_FILE)))["allowed"] == sel
    # desmoe: the newest record at or before the checkpoint's step (7) is the checkpoint's selection
    run_dir, ref = make_run(tmp_path, "qwen3_moe", mode="desmoe_no_alr", name="d")
    _add_selection(run_dir, ref, sel, step=5)
    _add_selection(run_dir, ref, _selection("qwen2_moe") | {"math": [[4, 5, 6], [4, 5, 6]]}, step=10)
    export_run(run_dir, str(tmp_path / "d_out"))
    content = json.load(open(tmp_path / "d_out" / DOMAIN_EXPERTS_FILE))
    assert content["step"] == 5 and content["selected"] == sel


def test_top_up_rule():
    scores = [0.1, 0.5, -1.0, 0.5, 0.9, 0.0, 0.2, 0.3]
    assert restrict.top_up([2], scores, need=3) == [1, 2, 4]  # 0.9, then 0.5 (lower id of the tie)
    assert restrict.top_up([0, 5, 7], scores, need=2) == [0, 5, 7]  # never removes
    g = {"n_group": 2, "group_size": 4}
    assert restrict.top_up([0], scores, need=2, grouping=g, per_group=2) == [0, 1, 4, 7]
    # routing geometry: deepseek_v3's tiny model groups (2 of 4, one group per token, top-2 group scores)
    geo = restrict.routing_geometry(restrict.routers(_perturbed("deepseek_v3"))[1])
    assert geo["grouping"] == {"n_group": 2, "topk_group": 1, "per_group": 2, "group_size": 4}
    assert restrict.routing_geometry(restrict.routers(_perturbed("deepseek_v2"))[1])["grouping"] is None


def test_grouped_pruning_balances_groups(tmp_path):
    run_dir, ref = make_run(tmp_path, "deepseek_v3", mode="desmoe_no_alr")
    # math: layer 1 selects 3 experts of group 0 -> every group of every layer keeps 3: K = 6
    _add_selection(run_dir, ref, {"math": [[0, 1, 2], [5]], "code": [[4], [0]]})
    full = str(tmp_path / "full")
    export_run(run_dir, full)
    content = json.load(open(os.path.join(full, DOMAIN_EXPERTS_FILE)))
    # each group topped up to 2 allowed (the next most affine of the group: 0.001 * id)
    assert content["allowed"]["math"] == [[0, 1, 2, 6, 7], [2, 3, 5, 7]]
    meta = export_run(run_dir, str(tmp_path / "p"), domain="math", prune=True)
    assert meta["pruned"]["num_experts"] == 6
    assert list(meta["pruned"]["kept"].values()) == [[0, 1, 2, 5, 6, 7], [1, 2, 3, 5, 6, 7]]
    config = json.load(open(tmp_path / "p" / "config.json"))
    assert config["n_routed_experts"] == 6 and config["n_group"] == 2 and config["topk_group"] == 1
    got = _logits(load_pretrained(str(tmp_path / "p"), domain="math"))
    assert (got - _logits(load_pretrained(full, domain="math"))).abs().max().item() <= TOL


# ---- bad input ---------------------------------------------------------------------------------


def test_bad_input_is_a_clear_error(tmp_path, capsys):
    run_dir, ref = make_run(tmp_path, "mixtral", mode="fft")
    out = str(tmp_path / "fft")
    assert export_run(run_dir, out)["domain_experts"] is None
    assert not os.path.exists(os.path.join(out, DOMAIN_EXPERTS_FILE))
    with pytest.raises(DomainError, match="method.mode fft.*desmoe, desmoe_no_alr, desmoe_no_dges, esft_gate"):
        load_pretrained(out, domain="math")
    with pytest.raises(DomainError, match="method.mode fft"):
        export_run(run_dir, str(tmp_path / "x"), domain="math", prune=True)
    with pytest.raises(ExportError, match="--prune needs --domain"):
        export_run(run_dir, str(tmp_path / "x"), prune=True)
    with pytest.raises(ExportError, match="without --prune"):
        export_run(run_dir, str(tmp_path / "x"), domain="math")

    run_dir, ref = make_run(tmp_path, "qwen3_moe", mode="desmoe_no_alr", name="d")
    with pytest.raises(DomainError, match="precedes its first affinity update"):
        export_run(run_dir, str(tmp_path / "x"), domain="math", prune=True)
    export_run(run_dir, str(tmp_path / "early"))
    with pytest.raises(DomainError, match="precedes its first affinity update"):
        load_pretrained(str(tmp_path / "early"), domain="math")
    _add_selection(run_dir, ref, _selection("qwen3_moe"))
    export_run(run_dir, str(tmp_path / "full"))
    with pytest.raises(DomainError, match="'law' is not one of the run's domains.*math, code"):
        load_pretrained(str(tmp_path / "full"), domain="law")
    export_run(run_dir, str(tmp_path / "pm"), domain="math", prune=True)
    with pytest.raises(DomainError, match="keeps only domain 'math'"):
        load_pretrained(str(tmp_path / "pm"), domain="code")
    assert not os.path.exists(tmp_path / "x")
    esft, _ = make_run(tmp_path, "qwen3_moe", mode="esft_token", name="esft")  # no esft_selection.json
    assert export_run(esft, str(tmp_path / "esft_out"))["domain_experts"] is None
    with pytest.raises(DomainError, match="no esft_selection.json"):
        load_pretrained(str(tmp_path / "esft_out"), domain="math")

    for args, needles in [(["--domain", "law", "--prune"], ["'law' is not one of", "math, code"]),
                          (["--prune"], ["--prune needs --domain"])]:
        capsys.readouterr()
        assert cli_main(["export", run_dir, "--out", str(tmp_path / "x"), *args]) == 2
        err = capsys.readouterr().err
        assert err.startswith("desmoe: error:") and "Traceback" not in err
        assert all(n in err for n in needles), err

    # a family whose config cannot describe fewer experts (none of the six): named, with the alternative
    content = json.load(open(tmp_path / "full" / DOMAIN_EXPERTS_FILE))
    other = dataclasses.replace(FAMILIES["qwen3_moe"], model_type="switch_transformers")
    with pytest.raises(DomainError, match=r"pruned exports exist for deepseek_v2.*load_pretrained\(DIR, domain=NAME\)"):
        restrict.prune_plan(content, "math", other)
    model = _perturbed("qwen3_moe")
    with pytest.raises(DomainError, match="fewer than the router's top_k 2"):
        restrict.restrict(model, {0: [3]})
    with pytest.raises(DomainError, match="layers \\[5\\]"):
        restrict.restrict(model, {5: [0, 1]})
    v3 = _perturbed("deepseek_v3")
    with pytest.raises(DomainError, match="groups \\[1\\] hold fewer than 2"):
        restrict.restrict(v3, {1: [0, 1, 2, 4]})
    assert json.load(open(tmp_path / "pm" / EXPORT_META))["pruned"]["domain"] == "math"


def test_eval_restricted_to_domains_writes_both_numbers(tmp_path):
    import yaml

    from desmoe.eval_checkpoint import eval_run

    run_dir, ref = make_run(tmp_path, "qwen2_moe", mode="desmoe_no_alr")
    cfg = yaml.safe_load(open(os.path.join(run_dir, "config.yaml")))
    cfg["eval"] = {"max_pairs": 2, "max_new_tokens": 4}
    cfg["data"]["eval_sequences"] = 2
    with open(os.path.join(run_dir, "config.yaml"), "w") as f:
        yaml.safe_dump(cfg, f)
    _add_selection(run_dir, ref, _selection("qwen2_moe"))
    result = eval_run(run_dir, restrict_to_domains=True)
    rec = json.load(open(os.path.join(run_dir, "eval_step7_restricted.json")))
    assert list(rec["domains"]) == ["math"] and rec["allowed"]["math"] == _selection("qwen2_moe")["math"]
    both = rec["domains"]["math"]
    assert both["unrestricted"] == json.load(open(os.path.join(run_dir, "eval_step7.json")))["results"]["math"]
    assert both["restricted"]["loss"] != both["unrestricted"]["loss"]
    assert {"loss", "ppl", "token_accuracy", "exact_match"} <= set(both["restricted"])
    md = open(os.path.join(run_dir, "eval_step7_restricted.md")).read()
    assert "| math |" in md and "loss restricted" in md and "Not restricted" not in md
    assert result["restricted"]["results"]["math"] == both["restricted"]

    # the restricted loss is the loss of load_pretrained(DIR, domain="math")
    from desmoe.data import build_domain_data, build_tokenizer, load_domain_examples
    from desmoe.evaluation import evaluate_sets
    from desmoe.rundir import load_run_config

    out = str(tmp_path / "full")
    export_run(run_dir, out)
    model = load_pretrained(out, domain="math").eval()
    c = load_run_config(run_dir)
    loaded = load_domain_examples(c.data)
    data, _ = build_domain_data(c.data, build_tokenizer(c.data, c.model, loaded[0]), loaded)
    got = evaluate_sets(lambda ids, **kw: model(input_ids=ids).logits, {"math": data["math"]}, batch_size=2)
    assert got["math"]["loss"] == pytest.approx(both["restricted"]["loss"], abs=1e-6)

    # with a coverage: its own files (the training selection's are left as they were), the rule named
    result = eval_run(run_dir, restrict_to_domains=True, coverage=0.5)
    assert json.load(open(os.path.join(run_dir, "eval_step7_restricted.json"))) == rec
    cov = json.load(open(os.path.join(run_dir, "eval_step7_restricted_cov0.5.json")))
    assert cov["selection"]["coverage"] == 0.5 and cov["selection"]["rule"] == restrict.COVERAGE_RULE
    assert cov["allowed"]["math"] == [[0, 3], [2, 5]]  # of 1.0 - 0.01 * e selected, 0.001 * e the rest
    assert result["restricted"]["rule"] == "coverage 0.5"
    assert "(coverage 0.5)" in open(os.path.join(run_dir, "eval_step7_restricted_cov0.5.md")).read()
    model = load_pretrained(out, domain="math", coverage=0.5).eval()
    got = evaluate_sets(lambda ids, **kw: model(input_ids=ids).logits, {"math": data["math"]}, batch_size=2)
    assert got["math"]["loss"] == pytest.approx(cov["domains"]["math"]["restricted"]["loss"], abs=1e-6)
    with pytest.raises(DomainError, match="--coverage 0.5 without --restrict-to-domains"):
        eval_run(run_dir, coverage=0.5)

    fft, _ = make_run(tmp_path, "qwen2_moe", mode="fft", name="fft")
    with pytest.raises(DomainError, match="--restrict-to-domains: the run trained in method.mode fft"):
        eval_run(fft, restrict_to_domains=True)


# ---- the serving selection: coverage of the domain's affinity --------------------------------------


def test_coverage_rule_exact_sets():
    scores = [0.1, 0.4, 0.0, 0.2, 0.3]  # total 1.0
    for coverage, want in [(0.3, [1]), (0.4, [1]), (0.5, [1, 4]), (0.71, [1, 3, 4]), (0.9, [1, 3, 4]),
                           (0.95, [0, 1, 3, 4]), (1.0, [0, 1, 3, 4])]:  # never the zero-score expert 2
        assert restrict.compute_coverage_experts(scores, coverage) == want, coverage
    # 0.9 above reaches its target although a running float sum 0.4 + 0.3 + 0.2 is 0.8999999999999999
    # ties by lower id
    assert restrict.compute_coverage_experts([0.25] * 4, 0.5) == [0, 1]
    assert restrict.compute_coverage_experts([0.25] * 4, 0.51) == [0, 1, 2]
    # -1 (no estimate) counts 0: neither in the total nor chosen
    assert restrict.compute_coverage_experts([-1.0, 0.5, -1.0, 0.5], 1.0) == [1, 3]
    assert restrict.compute_coverage_experts([-1.0, 0.5, -1.0, 1.5], 0.5) == [3]
    assert restrict.compute_coverage_experts([-1.0] * 4, 0.9) == []
    # topped up to top_k by score (0.0 before -1), as the training selection is
    flat = {"top_k": 3, "grouping": None}
    assert restrict.coverage_allowed(scores, 0.3, flat) == [1, 3, 4]
    assert restrict.coverage_allowed(scores, 0.9, flat) == [1, 3, 4]
    assert restrict.coverage_allowed([-1.0, -1.0, 0.6, 0.0], 0.5, {"top_k": 2, "grouping": None}) == [2, 3]
    assert restrict.coverage_allowed([-1.0] * 4, 0.5, {"top_k": 2, "grouping": None}) == [0, 1]
    # group-limited routing (2 groups of 4, each needs 2 allowed): the short group topped up by its own scores
    grouped = {"top_k": 2, "grouping": {"n_group": 2, "topk_group": 1, "per_group": 2, "group_size": 4}}
    g_scores = [0.5, 0.3, 0.1, 0.0, 0.05, 0.02, 0.03, 0.0]
    assert restrict.coverage_allowed(g_scores, 0.8, grouped) == [0, 1, 4, 6]
    assert restrict.coverage_allowed(g_scores, 0.9, grouped) == [0, 1, 2, 4, 6]
    assert restrict.coverage_allowed(g_scores, 1.0, grouped) == [0, 1, 2, 4, 5, 6]


def test_coverage_bad_values_and_content():
    assert restrict.check_coverage(None) is None and restrict.check_coverage(1) == 1.0
    for bad in (0, 0.0, -0.1, 1.5, float("nan"), float("inf"), True, "0.9"):
        with pytest.raises(DomainError, match=r"not a fraction in \(0, 1\]"):
            restrict.check_coverage(bad)
    content = {"domains": ["a", "b"], "layers": [3], "top_k": 2, "grouping": None, "rule": restrict.ALLOWED_RULE,
               "coverage": None, "selected": {"a": [[0]], "b": [[3]]}, "allowed": {"a": [[0, 1]], "b": [[2, 3]]},
               "scores": [[[0.5, 0.25, 1.25, 0.0], [0.5, 0.5, 0.5, 0.5]]]}
    assert restrict.with_coverage(content, None) is content  # the training selection, untouched
    got = restrict.with_coverage(content, 0.5)
    assert got["coverage"] == 0.5 and got["rule"] == restrict.COVERAGE_RULE and content["coverage"] is None
    assert got["selected"] == {"a": [[2]], "b": [[0, 1]]} and got["allowed"] == {"a": [[0, 2]], "b": [[0, 1]]}
    assert restrict.rule_name(got) == "coverage 0.5" and restrict.rule_name(content) == "training selection"
    pruned = dict(got, pruned_for="a")
    assert restrict.with_coverage(pruned, 0.5) is pruned
    with pytest.raises(DomainError, match="pruned for domain 'a' with coverage 0.5.*full export"):
        restrict.with_coverage(pruned, 0.9)
    with pytest.raises(DomainError, match="pruned for domain 'a' with the training selection"):
        restrict.with_coverage(dict(content, pruned_for="a"), 0.9)


def _add_affinity(run_dir, scores, selected, *, step=5):
    """An affinity record with the given ``scores`` [L][D][E] and training masks ``selected``."""
    n = len(scores[0][0])
    masks = [[[int(e in selected[d][li]) for e in range(n)] for d in DOMAINS] for li in range(len(scores))]
    os.makedirs(os.path.join(run_dir, "affinity"), exist_ok=True)
    with open(os.path.join(run_dir, "affinity", f"step{step:06d}.json"), "w") as f:
        json.dump({"step": step, "domains": DOMAINS, "layers": [0, 1], "affinity": scores, "masks": masks}, f)


COVERAGE_SCORES = [  # [layer][domain][expert] of qwen3_moe's tiny model (8 experts, top_k 2), totals 2.0
    [[1.0, 0.5, 0.25, 0.125, 0.125, -1.0, 0.0, 0.0], [0.25] * 8],
    [[0.0, 0.25, 1.25, 0.25, 0.125, 0.125, 0.0, 0.0], [0.25] * 8]]


def test_coverage_restricts_and_prunes_an_export(tmp_path, capsys):
    run_dir, ref = make_run(tmp_path, "qwen3_moe", mode="desmoe")  # with adaptive routers
    _add_affinity(run_dir, COVERAGE_SCORES, {"math": [[5, 6], [6, 7]], "code": [[0, 1], [2, 3]]})
    full = str(tmp_path / "full")
    export_run(run_dir, full)
    content = json.load(open(os.path.join(full, DOMAIN_EXPERTS_FILE)))
    assert content["coverage"] is None and content["allowed"]["math"] == [[5, 6], [6, 7]]
    free, training = _logits(load_pretrained(full)), _logits(load_pretrained(full, domain="math"))
    # coverage 0.5: one expert holds half of each layer, topped up to top_k 2
    half = load_pretrained(full, domain="math", coverage=0.5)
    seen, half_logits = _routing(half, IDS)
    assert all(set(outs[-1][2].flatten().tolist()) <= set(a) for outs, a in zip(seen.values(), [[0, 1], [1, 2]]))
    assert (half_logits - training).abs().max().item() > 1e-4 and (half_logits - free).abs().max().item() > 1e-4
    # coverage 0.8: allowed [[0, 1, 2], [1, 2, 3]], K = 3 = allowed in every layer
    out = str(tmp_path / "math80")
    assert cli_main(["export", run_dir, "--out", out, "--domain", "math", "--prune", "--coverage", "0.8"]) == 0
    assert "pruned for domain math (coverage 0.8): 3 of 8 experts" in capsys.readouterr().out
    meta = json.load(open(os.path.join(out, EXPORT_META)))["pruned"]
    assert meta["coverage"] == 0.8 and meta["rule"] == restrict.COVERAGE_RULE and meta["num_experts"] == 3
    assert meta["kept"] == {"model.layers.0.mlp": [0, 1, 2], "model.layers.1.mlp": [1, 2, 3]}
    pruned = json.load(open(os.path.join(out, DOMAIN_EXPERTS_FILE)))
    assert pruned["coverage"] == 0.8 and pruned["allowed"]["math"] == [[0, 1, 2], [0, 1, 2]]
    assert load_plain(out).config.num_experts == 3  # a stock config, loaded strictly by transformers alone
    restricted = _logits(load_pretrained(full, domain="math", coverage=0.8))
    assert (_logits(load_pretrained(out, domain="math")) - restricted).abs().max().item() <= TOL
    assert (_logits(load_pretrained(out)) - restricted).abs().max().item() <= TOL  # kept == allowed
    assert torch.equal(_logits(load_pretrained(out, domain="math", coverage=0.8)), _logits(load_pretrained(out)))

    # bad input: named, one line, nothing written
    with pytest.raises(DomainError, match="pruned for domain 'math' with coverage 0.8"):
        load_pretrained(out, domain="math", coverage=0.9)
    with pytest.raises(DomainError, match="without a domain"):
        load_pretrained(full, coverage=0.9)
    with pytest.raises(ExportError, match="--coverage 0.9 without --prune"):
        export_run(run_dir, str(tmp_path / "x"), coverage=0.9)
    for argv, needle in [(["export", run_dir, "--out", str(tmp_path / "x"), "--domain", "math", "--prune",
                           "--coverage", "1.5"], r"coverage 1.5 is not a fraction in (0, 1]"),
                         (["export", run_dir, "--out", str(tmp_path / "x"), "--coverage", "0.9"], "without --prune"),
                         (["eval", run_dir, "--coverage", "0.9"], "without --restrict-to-domains")]:
        capsys.readouterr()
        assert cli_main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("desmoe: error:") and needle in err and "Traceback" not in err, err
    assert not os.path.exists(tmp_path / "x")
