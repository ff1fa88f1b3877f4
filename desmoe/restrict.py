"""Domain-restricted routing and per-domain pruning of a desmoe export.

A run of a mode with per-domain expert selection (desmoe, desmoe_no_alr, desmoe_no_dges: the masks of
the newest affinity update at or before the exported step; esft_gate, esft_token: esft_selection.json)
knows, per MoE layer, the experts each domain selected. ``desmoe export`` writes that selection beside
the model (DOMAIN_EXPERTS_FILE); from it:

- *restricted inference* (``desmoe.load_pretrained(DIR, domain=NAME)``, ``desmoe eval --restrict-to-domains``):
  each MoE layer's router routes among the domain's *allowed* experts only: a forward hook on the stock
  router sets the logits of the other experts to the dtype's most negative finite value (after the
  adaptive router's residual in the ALR modes) and routes again with the router's own forward
  (route_from_logits). Softmax routers give them probability exactly 0, sigmoid routers (DeepSeek-V3)
  score 0, and DeepSeek-V3's choice bias ``e_score_correction_bias`` is masked the same way, so a
  masked expert is never chosen and no NaN can arise;
- *pruning* (``desmoe export --domain NAME --prune``): a stock model with only the domain's kept experts,
  the same number K in every layer (so the stock config describes it), router rows, expert tensors and
  correction biases sliced to the kept ids in ascending order.

The allowed set of a domain in a layer (allowed_experts): its selected experts, topped up with its next
most affine ones (the run's final affinity / ESFT score, ties by lower id) until there are ``top_k``;
under group-limited routing (DeepSeek ``n_group`` > 1 with ``topk_group`` < ``n_group``; a token first
picks ``topk_group`` groups) every group is topped up to ``max(ceil(top_k / topk_group), 2 for
DeepSeek-V3, whose groups are scored by their two best experts)`` allowed experts, so whatever groups a
token picks hold top_k allowed ones. The kept set of a pruned domain (prune_plan) is the allowed set
topped up the same way to K = the largest allowed count over layers (grouped: every group to the same
count c, K = n_group·c, n_group and topk_group kept). Because masked experts get probability 0, softmax
over the allowed set is the softmax of a model that has only those experts: a pruned model restricted
to the same allowed set routes as the restricted full model, and where kept == allowed the pruned stock
model (no hook) computes the restricted full model's logits.

The training selection is chosen for gradient isolation, not for serving: restricted to it a domain can
lose much of its held-out loss. A *serving* selection (``coverage``: COVERAGE_RULE, coverage_allowed) takes
instead, per layer, the domain's most affine experts until they hold ``coverage`` of its affinity, topped
up the same way; ``load_pretrained(DIR, domain=NAME, coverage=C)``, ``desmoe eval --restrict-to-domains
--coverage C`` and ``desmoe export --domain NAME --prune --coverage C`` use it (with_coverage).
"""

from __future__ import annotations

import copy
import json
import math
import os

import torch
from torch import nn

from desmoe.affinity_report import affinity_records
from desmoe.constants import DES_MODES, ESFT_MODES, METHOD_STATE_MODES
from desmoe.models import FAMILIES, Family, get_family
from desmoe.rundir import ESFT_SELECTION_FILE

DOMAIN_EXPERTS_FILE = "domain_experts.json"
FORMAT = "desmoe-domain-experts"
FORMAT_VERSION = 1
SELECTION_MODES = METHOD_STATE_MODES
"""The modes whose runs select experts per domain (the others, fft and lora, have no selection)."""
PRUNE_CONFIG_ATTRS = {name: f.num_experts_attr for name, f in FAMILIES.items()}
"""The config attribute that holds the routed-expert count of each family a pruned export can describe."""
ALLOWED_RULE = ("selected experts, topped up with the domain's next most affine ones (score descending, ties by "
                "lower id) to top_k; under group-limited routing each group topped up to "
                "max(ceil(top_k / topk_group), 2 for deepseek_v3)")
COVERAGE_RULE = ("the domain's most affine experts (its affinity at the exported step, or ESFT score: descending, "
                 "ties by lower id; -1, no estimate, counts 0) until their cumulative score reaches coverage x the "
                 "layer's total, then topped up as the training selection is (to top_k; under group-limited routing "
                 "each group to max(ceil(top_k / topk_group), 2 for deepseek_v3))")
_STATE = "_desmoe_routing"


class DomainError(ValueError):
    """A domain restriction or pruning a user asked for that cannot be done (no selection in the run's mode,
    an unknown domain, a family or routing a pruned config cannot describe)."""


def _modes_with_selection() -> str:
    return ", ".join(SELECTION_MODES)


def no_selection_message(mode: str, what: str) -> str:
    return (f"{what}: the run trained in method.mode {mode}, which selects no experts per domain, so there is "
            f"nothing to restrict to. The modes with a per-domain selection are {_modes_with_selection()}; "
            "evaluate or export this run without a domain.")


def no_selection_yet(mode: str, tag: str, step) -> str:
    """Why a run of a mode with a selection has none for checkpoint ``tag``."""
    if mode in ESFT_MODES:
        return (f"the {mode} run had no {ESFT_SELECTION_FILE} when checkpoint {tag} was exported (ESFT writes it "
                "after profiling, before training). Export a run that finished its profile.")
    return (f"checkpoint {tag} (step {step}) of this {mode} run precedes its first affinity update, so no domain "
            "has selected experts yet. Export a later checkpoint (desmoe export --checkpoint TAG).")


# ---------------------------------------------------------------------------------------------
# Routers: logits -> routing, and the desmoe hook (adaptive router residual, then the domain mask)
# ---------------------------------------------------------------------------------------------


class _LogitsRouter:
    """A stock HF router seen with an identity weight over the expert axis, so its own forward routes
    given logits [T, E] instead of hidden states (every supported family's router starts with
    ``F.linear(hidden_states.view(-1, self.hidden_dim), self.weight)``). ``overrides`` replace other
    attributes (the masked ``e_score_correction_bias``); everything else is the router's."""

    def __init__(self, router: nn.Module, logits: torch.Tensor, **overrides):
        self._router = router
        self.hidden_dim = logits.shape[-1]
        self.weight = torch.eye(logits.shape[-1], dtype=logits.dtype, device=logits.device)
        self.__dict__.update(overrides)

    def __getattr__(self, name):
        return getattr(self._router, name)


def route_from_logits(router: nn.Module, logits: torch.Tensor, **overrides):
    """The router's output (logits, weights, indices) for given router logits [T, E]."""
    return type(router).forward(_LogitsRouter(router, logits, **overrides), logits)


class RouterState:
    """What desmoe's hook on one stock router does: ``alr`` (an AdaptiveRouter whose residual is added to
    the logits) and ``allowed`` (bool [E]: the experts the router may choose; None = all)."""

    def __init__(self):
        self.alr: nn.Module | None = None
        self.allowed: torch.Tensor | None = None


def masked_routing(router: nn.Module, logits: torch.Tensor, allowed: torch.Tensor):
    """The router's output for ``logits`` with every expert outside ``allowed`` (bool [E]) masked."""
    allowed = allowed.to(logits.device)
    logits = logits.masked_fill(~allowed, torch.finfo(logits.dtype).min)
    overrides = {}
    bias = getattr(router, "e_score_correction_bias", None)
    if isinstance(bias, torch.Tensor):  # DeepSeek-V3 chooses on sigmoid(logits) + bias
        overrides["e_score_correction_bias"] = bias.masked_fill(~allowed.to(bias.device), torch.finfo(bias.dtype).min)
    return route_from_logits(router, logits, **overrides)


def _hook(router, args, output):
    state = router.__dict__[_STATE]
    if state.alr is None and state.allowed is None:
        return None
    logits = output[0]
    if state.alr is not None:
        h = args[0].reshape(-1, router.weight.shape[1])
        logits = logits + state.alr.residual(h).to(logits.dtype)
    if state.allowed is None:
        return route_from_logits(router, logits)
    return masked_routing(router, logits, state.allowed)


def router_state(router: nn.Module) -> RouterState:
    """The desmoe routing state of a stock router, hooking the router on first use. The hook is prepended,
    so transformers' own recorders of router logits (output_router_logits) see the logits it routes on."""
    state = router.__dict__.get(_STATE)
    if state is None:
        check_router_reroutes(router)
        state = RouterState()
        object.__setattr__(router, _STATE, state)
        router.register_forward_hook(_hook, prepend=True)
    return state


@torch.no_grad()
def check_router_reroutes(router: nn.Module) -> None:
    """route_from_logits must reproduce the router on its own logits; refuse a router it does not fit."""
    h = torch.randn(4, router.weight.shape[1], generator=torch.Generator().manual_seed(0)).to(router.weight)
    want = router(h)
    try:
        got = route_from_logits(router, want[0])
        same = all(torch.allclose(a.float(), b.float(), atol=1e-6, rtol=1e-5) for a, b in zip(want, got))
    except Exception as e:  # a router whose forward does not start from F.linear(h, weight)
        same, err = False, e
    else:
        err = None
    if not same:
        raise DomainError(f"the router {type(router).__name__} does not compute its logits as F.linear(h, weight); "
                          f"desmoe cannot re-route it (adaptive router, domain restriction) ({err}).")


# ---------------------------------------------------------------------------------------------
# Routing geometry of a model: top_k, expert count, groups
# ---------------------------------------------------------------------------------------------


def routers(model: nn.Module, layers: list[int] | None = None) -> dict[int, nn.Module]:
    """{decoder layer index: stock router} of every MoE layer (or of ``layers``)."""
    family = get_family(model.config.model_type)
    out = {}
    for i, layer in enumerate(family.decoder_layers(model)):
        block = getattr(layer, family.moe_block_attr, None)
        router = getattr(block, family.router_attr, None)
        if isinstance(router, nn.Module) and hasattr(router, "top_k") and (layers is None or i in layers):
            out[i] = router
    if layers is not None and set(layers) - set(out):
        raise DomainError(f"decoder layers {sorted(set(layers) - set(out))} of this {model.config.model_type} model "
                          f"have no MoE router (its MoE layers: {sorted(routers(model))}).")
    return out


def routing_geometry(router: nn.Module) -> dict:
    """top_k, num_experts and the group limit of a stock router (``grouping`` None where a token may pick
    any expert; else n_group, topk_group and the allowed experts each group needs, ``per_group``)."""
    top_k, n_experts = int(router.top_k), int(router.weight.shape[0])
    n_group, topk_group = int(getattr(router, "num_group", 1) or 1), int(getattr(router, "topk_group", 1) or 1)
    sigmoid_groups = isinstance(getattr(router, "e_score_correction_bias", None), torch.Tensor)  # deepseek_v3
    group_limited = sigmoid_groups or getattr(router, "topk_method", None) == "group_limited_greedy"
    grouping = None
    if group_limited and 1 < n_group and topk_group < n_group:
        grouping = {"n_group": n_group, "topk_group": topk_group,
                    "per_group": max(math.ceil(top_k / topk_group), 2 if sigmoid_groups else 1),
                    "group_size": n_experts // n_group}
    return {"top_k": top_k, "num_experts": n_experts, "grouping": grouping, "sigmoid_groups": sigmoid_groups,
            "n_group": n_group}


def top_up(chosen: list[int], scores: list[float], *, need: int, grouping: dict | None = None,
           per_group: int = 0) -> list[int]:
    """``chosen`` plus the next best experts by ``scores`` (descending, ties by lower id; a score that is
    missing or negative counts as lowest) until there are ``need`` and, with ``grouping``, every group
    holds ``per_group``. Sorted ascending."""
    def key(e):
        s = scores[e]
        return (-(s if s is not None and math.isfinite(s) and s >= 0 else -1.0), e)

    out = set(chosen)
    order = sorted(range(len(scores)), key=key)
    if grouping is not None:
        size = grouping["group_size"]
        for g in range(grouping["n_group"]):
            members = [e for e in order if e // size == g]
            for e in members:
                if sum(1 for x in out if x // size == g) >= per_group:
                    break
                out.add(e)
    for e in order:
        if len(out) >= need:
            break
        out.add(e)
    return sorted(out)


def check_coverage(coverage) -> float | None:
    """``coverage`` as a float in (0, 1], or None (the training selection); DomainError for anything else."""
    if coverage is None:
        return None
    ok = isinstance(coverage, (int, float)) and not isinstance(coverage, bool) and math.isfinite(coverage)
    if not ok or not 0 < coverage <= 1:
        raise DomainError(f"coverage {coverage!r} is not a fraction in (0, 1]: it is the share of a domain's affinity "
                          "(per MoE layer) its allowed experts must hold, e.g. 0.9. Pass a value in (0, 1], or none "
                          "for the run's training selection.")
    return float(coverage)


def compute_coverage_experts(scores: list[float], coverage: float) -> list[int]:
    """The experts (ascending ids) with the highest ``scores`` (descending, ties by lower id; a missing,
    negative or non-finite score counts 0) taken until their cumulative score reaches ``coverage`` x the
    total. ``scores`` [E]; [] where every score is 0 (no estimate: top_up then chooses)."""
    s = [x if x is not None and math.isfinite(x) and x > 0 else 0.0 for x in scores]
    # NOTE: fsum is exactly rounded, so at coverage 1 the prefix of every positive score equals the total
    # exactly and no zero-score expert is added; the relative slack only absorbs the rounding of coverage x total.
    target = coverage * math.fsum(s) * (1 - 1e-12)
    out, taken = [], []
    for e in sorted(range(len(s)), key=lambda e: (-s[e], e)):
        if s[e] <= 0 or math.fsum(taken) >= target:
            break
        out.append(e)
        taken.append(s[e])
    return sorted(out)


def coverage_allowed(scores: list[float], coverage: float, geometry: dict) -> list[int]:
    """One layer's allowed experts under COVERAGE_RULE: compute_coverage_experts topped up (top_up) to
    ``geometry["top_k"]`` and, with ``geometry["grouping"]``, every group to its ``per_group``."""
    g = geometry["grouping"]
    return top_up(compute_coverage_experts(scores, coverage), scores, need=geometry["top_k"], grouping=g,
                  per_group=g["per_group"] if g else 0)


def with_coverage(content: dict, coverage: float | None, *, where: str = "coverage") -> dict:
    """A domain_experts.json ``content`` whose every domain's allowed experts follow COVERAGE_RULE at
    ``coverage`` ("selected": the experts that cover it, before the top-up; "rule", "coverage" say so);
    ``content`` itself for None (the training selection). On a pruned export (its scores cut to the kept
    experts) only the coverage it was pruned with is accepted, DomainError otherwise."""
    coverage = check_coverage(coverage)
    if coverage is None:
        return content
    if content.get("pruned_for") is not None:
        if content.get("coverage") == coverage:
            return content
        own = content.get("coverage")
        own = "the training selection" if own is None else f"coverage {own:g}"
        raise DomainError(f"{where} {coverage:g}: this export is pruned for domain {content['pruned_for']!r} with "
                          f"{own}; it holds only the experts that rule kept, so another coverage cannot be measured "
                          "on it. Load it without coverage (its own allowed experts), or apply the coverage to the "
                          "full export (desmoe export without --prune).")
    geometry = {"top_k": content["top_k"], "grouping": content["grouping"]}
    selected, allowed = {}, {}
    for di, d in enumerate(content["domains"]):
        per_layer = [content["scores"][li][di] for li in range(len(content["layers"]))]
        selected[d] = [compute_coverage_experts(s, coverage) for s in per_layer]
        allowed[d] = [coverage_allowed(s, coverage, geometry) for s in per_layer]
    return dict(content, rule=COVERAGE_RULE, coverage=coverage, selected=selected, allowed=allowed)


def rule_name(content: dict) -> str:
    """A short name of the rule of a domain_experts.json content: "training selection" or "coverage C"."""
    c = content.get("coverage")
    return "training selection" if c is None else f"coverage {c:g}"


# ---------------------------------------------------------------------------------------------
# The run's selection -> domain_experts.json
# ---------------------------------------------------------------------------------------------


def run_selection(run_dir: str, mode: str, step: int | None) -> dict | None:
    """The per-domain selection of a run at step ``step`` (None: its newest): {"domains", "layers" (decoder
    layer indices), "selected" {domain: [[expert ids] per layer]}, "scores" [L][D][E], "score", "source",
    "step"}. None for the modes without one (fft, lora) and for a desmoe run before its first affinity update."""
    if mode in DES_MODES:
        best = None
        for path in affinity_records(run_dir):
            with open(path, encoding="utf-8") as f:
                rec = json.load(f)
            if step is None or int(rec["step"]) <= step:
                if best is None or int(rec["step"]) >= int(best[0]["step"]):
                    best = (rec, path)
        if best is None:
            return None
        rec, path = best
        return {"domains": list(rec["domains"]), "layers": list(rec["layers"]),
                "selected": {d: [[e for e, on in enumerate(rec["masks"][li][di]) if on]
                                 for li in range(len(rec["layers"]))] for di, d in enumerate(rec["domains"])},
                "scores": rec["affinity"], "score": "affinity (share of the domain's tokens routed to the expert, "
                "EMA; -1 = no estimate)", "source": path, "step": int(rec["step"])}
    if mode in ESFT_MODES:
        path = os.path.join(run_dir, ESFT_SELECTION_FILE)
        if not os.path.isfile(path):
            return None
        with open(path, encoding="utf-8") as f:
            sel = json.load(f)
        return {"domains": list(sel["domains"]), "layers": list(sel["layers"]),
                "selected": {d: [list(ids) for ids in sel["selected"][d]] for d in sel["domains"]},
                "scores": sel["scores"], "score": sel.get("score", "esft score"), "source": path, "step": None}
    return None


def domain_experts(selection: dict, model: nn.Module, moe_modules: list[str], mode: str) -> dict:
    """The content of DOMAIN_EXPERTS_FILE for ``model``: the run's selection plus each domain's allowed
    experts per layer (ALLOWED_RULE), checked against the model's MoE layers."""
    layers = selection["layers"]
    rs = routers(model, layers)
    geos = [routing_geometry(rs[i]) for i in layers]
    allowed = {}
    for di, d in enumerate(selection["domains"]):
        per_layer = []
        for li, geo in enumerate(geos):
            scores = selection["scores"][li][di]
            if len(scores) != geo["num_experts"]:
                raise DomainError(f"{selection['source']}: layer {layers[li]} scores {len(scores)} experts, the "
                                  f"model has {geo['num_experts']}. Was config.yaml changed after the run?")
            g = geo["grouping"]
            per_layer.append(top_up(selection["selected"][d][li], scores, need=geo["top_k"], grouping=g,
                                    per_group=g["per_group"] if g else 0))
        allowed[d] = per_layer
    return {"format": FORMAT, "version": FORMAT_VERSION, "mode": mode, "source": selection["source"],
            "step": selection["step"], "domains": selection["domains"], "layers": layers,
            "moe_modules": moe_modules, "num_experts": geos[0]["num_experts"], "top_k": geos[0]["top_k"],
            "grouping": geos[0]["grouping"], "score": selection["score"], "rule": ALLOWED_RULE, "coverage": None,
            "selected": selection["selected"], "allowed": allowed, "scores": selection["scores"]}


def write_domain_experts(out_dir: str, content: dict) -> None:
    with open(os.path.join(out_dir, DOMAIN_EXPERTS_FILE), "w", encoding="utf-8") as f:
        json.dump(content, f, indent=1)


def read_domain_experts(path: str, meta: dict) -> dict:
    """The domain_experts.json of an export directory (``meta``: its desmoe_export.json); DomainError naming
    why there is none (the run's mode, or a checkpoint before the first affinity update)."""
    name = meta.get("domain_experts")
    if not name:
        mode = meta.get("mode")
        if mode not in SELECTION_MODES:
            raise DomainError(no_selection_message(mode, f"{path}"))
        raise DomainError(f"{path}: {no_selection_yet(mode, meta.get('checkpoint'), meta.get('global_steps'))}")
    file = os.path.join(path, name)
    if not os.path.isfile(file):
        raise DomainError(f"{file} is missing: the export is incomplete. Export the run again.")
    with open(file, encoding="utf-8") as f:
        content = json.load(f)
    if content.get("format") != FORMAT or int(content.get("version", 0)) > FORMAT_VERSION:
        raise DomainError(f"{file}: not a {FORMAT} file version <= {FORMAT_VERSION} this desmoe reads.")
    return content


def check_domain(content: dict, domain: str, where: str) -> None:
    if domain not in content["domains"]:
        pruned = content.get("pruned_for")
        note = f" (a pruned export keeps only domain {pruned!r}'s experts)" if pruned else ""
        raise DomainError(f"{where}: domain {domain!r} is not one of the run's domains{note}: "
                          f"{', '.join(map(str, content['domains']))}. Pass one of them.")


# ---------------------------------------------------------------------------------------------
# Restricting a model
# ---------------------------------------------------------------------------------------------


def restrict(model: nn.Module, allowed: dict[int, list[int]] | None) -> None:
    """Route each MoE layer (decoder layer index -> allowed expert ids) only among its allowed experts;
    ``None`` lifts every restriction. Composes with the adaptive routers (residual first, then the mask).
    A layer needs at least top_k allowed experts (and, under group-limited routing, the per-group minimum
    routing_geometry names): DomainError otherwise."""
    if allowed is None:
        for router in routers(model).values():
            state = router.__dict__.get(_STATE)
            if state is not None:
                state.allowed = None
        return
    rs = routers(model, list(allowed))
    for i, ids in allowed.items():
        router = rs[i]
        geo = routing_geometry(router)
        ids = sorted(set(int(e) for e in ids))
        if not ids or ids[0] < 0 or ids[-1] >= geo["num_experts"]:
            raise DomainError(f"layer {i}: expert ids {ids} outside 0..{geo['num_experts'] - 1}.")
        if len(ids) < geo["top_k"]:
            raise DomainError(f"layer {i}: {len(ids)} allowed experts {ids}, fewer than the router's top_k "
                              f"{geo['top_k']}. Allow at least top_k experts (desmoe.restrict.top_up).")
        g = geo["grouping"]
        if g is not None:
            counts = [sum(1 for e in ids if e // g["group_size"] == k) for k in range(g["n_group"])]
            short = [k for k, c in enumerate(counts) if c < g["per_group"]]
            if short:
                raise DomainError(f"layer {i}: groups {short} hold fewer than {g['per_group']} allowed experts; under "
                                  f"group-limited routing (n_group {g['n_group']}, topk_group {g['topk_group']}) every "
                                  "group needs that many (desmoe.restrict.top_up with grouping).")
        mask = torch.zeros(geo["num_experts"], dtype=torch.bool, device=router.weight.device)
        mask[ids] = True
        router_state(router).allowed = mask


def restrict_to_domain(model: nn.Module, content: dict, domain: str | None, *, where: str = "model") -> None:
    """Restrict ``model`` to ``domain``'s allowed experts of a domain_experts.json ``content``; None lifts it."""
    if domain is None:
        restrict(model, None)
        return
    check_domain(content, domain, where)
    restrict(model, dict(zip(content["layers"], content["allowed"][domain])))


# ---------------------------------------------------------------------------------------------
# Pruning
# ---------------------------------------------------------------------------------------------


def prune_plan(content: dict, domain: str, family: Family) -> dict:
    """Which experts a pruned export of ``domain`` keeps: {"num_experts" K, "kept" [[ids] per layer],
    "config" (the config attributes to set)}. DomainError for a family a pruned config cannot describe."""
    if family.model_type not in PRUNE_CONFIG_ATTRS:
        raise DomainError(f"--prune: a {family.model_type} config cannot describe fewer experts; pruned exports exist "
                          f"for {', '.join(sorted(PRUNE_CONFIG_ATTRS))}. Use restricted routing instead: "
                          "desmoe.load_pretrained(DIR, domain=NAME) on the full export.")
    d = content["domains"].index(domain)
    allowed, g = content["allowed"][domain], content["grouping"]
    if g is None:
        k = max(len(ids) for ids in allowed)
        kept = [top_up(ids, content["scores"][li][d], need=k) for li, ids in enumerate(allowed)]
        cfg = {PRUNE_CONFIG_ATTRS[family.model_type]: k}
        if family.model_type in ("deepseek_v2", "deepseek_v3"):
            cfg.update(n_group=1, topk_group=1)  # no group limit in effect: one group of all kept experts
    else:
        size = g["group_size"]
        c = max(sum(1 for e in ids if e // size == grp) for ids in allowed for grp in range(g["n_group"]))
        c = max(c, g["per_group"])
        kept = [top_up(ids, content["scores"][li][d], need=0, grouping=g, per_group=c)
                for li, ids in enumerate(allowed)]
        k = c * g["n_group"]
        assert all(len(ids) == k for ids in kept), kept
        cfg = {PRUNE_CONFIG_ATTRS[family.model_type]: k}  # n_group, topk_group kept: group g = kept ids of group g
    return {"domain": domain, "num_experts": k, "kept": kept, "config": cfg}


def pruned_config(config, plan: dict):
    config = copy.deepcopy(config)
    for key, value in plan["config"].items():
        setattr(config, key, value)
    return config


def prune_state(hf_state: dict, specs: list, kept: dict[str, list[int]], num_experts: int) -> dict:
    """The stock state dict with each MoE block (module name -> kept ids, ascending) cut to its kept experts:
    router weight rows, DeepSeek-V3's e_score_correction_bias, fused expert tensors along the expert axis
    (module-list experts renumbered 0..K-1). Shared experts and their gate are kept as they are."""
    out = dict(hf_state)
    for spec in specs:
        ids = kept[spec.moe_module_name]
        index = torch.tensor(ids, dtype=torch.long)
        remap = {old: new for new, old in enumerate(ids)}
        moe = spec.moe_module_name + "."
        experts = f"{moe}{spec.experts_name}."
        router = f"{moe}{spec.router_name}."
        bias = f"{moe}{spec.e_score_correction_bias_path or spec.router_name}.e_score_correction_bias"
        for key in [k for k in out if k.startswith(moe)]:
            t = out[key]
            if key.startswith(experts):
                rest = key[len(experts):]
                head, _, tail = rest.partition(".")
                if head.isdigit():  # module list: one module per expert
                    del out[key]
                    if int(head) in remap:
                        out[f"{experts}{remap[int(head)]}.{tail}"] = t
                elif t.dim() and t.shape[0] == num_experts:
                    out[key] = t.index_select(0, index).contiguous()
            elif (key.startswith(router) or key == bias) and t.dim() and t.shape[0] == num_experts:
                out[key] = t.index_select(0, index).contiguous()
    return out


def prune_adaptive_routers(tensors: dict, layer_key: str, kept: dict[int, list[int]]) -> dict:
    """The adaptive routers' tensors cut to the kept experts: the rows of teacher_weight, w2 and b2 of each
    layer (``layer_key``: ``...{layer}.adaptive_router.{name}``)."""
    out = dict(tensors)
    for i, ids in kept.items():
        index = torch.tensor(ids, dtype=torch.long)
        for name in ("teacher_weight", "w2", "b2"):
            key = layer_key.format(layer=i, name=name)
            if key in out:
                out[key] = out[key].index_select(0, index).contiguous()
    return out


def pruned_domain_experts(content: dict, plan: dict) -> dict:
    """The domain_experts.json of a pruned export: only the pruned domain, its ids in the pruned model's
    numbering (original id kept[l][j] -> j), its scores cut to the kept experts."""
    d = content["domains"].index(plan["domain"])
    name = plan["domain"]

    def renumber(li, ids):
        pos = {old: new for new, old in enumerate(plan["kept"][li])}
        return [pos[e] for e in ids]

    grouping = content["grouping"]
    if grouping is not None:
        grouping = dict(grouping, group_size=plan["num_experts"] // grouping["n_group"])
    return dict(content, domains=[name], num_experts=plan["num_experts"], grouping=grouping, pruned_for=name,
                kept_original_ids=plan["kept"],
                selected={name: [renumber(li, ids) for li, ids in enumerate(content["selected"][name])]},
                allowed={name: [renumber(li, ids) for li, ids in enumerate(content["allowed"][name])]},
                scores=[[[content["scores"][li][d][e] for e in kept]] for li, kept in enumerate(plan["kept"])])
