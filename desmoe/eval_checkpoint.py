"""``desmoe eval``: evaluate one checkpoint of a finished (or stopped) run, in this process.

The checkpoint is exported (desmoe.export: experts of every EP rank gathered, adaptive routers
attached) into a temporary directory, loaded back, and evaluated (desmoe.evaluation) on the run's
own eval rows and data.holdout, or (``data_config``) on another config's data section: its domains, eval
rows and holdout, tokenised with the run's own tokenizer (e.g. a run trained on discovered domains evaluated
on the true domains' held-out sets). ``restrict_to_domains``: each domain is evaluated again with every MoE
layer routing only among that domain's experts (desmoe.restrict; the same loaded model, the restriction
switched on per domain), written beside the unrestricted numbers; ``coverage``: restricted to each domain's
serving selection (desmoe.restrict.COVERAGE_RULE) instead of its training selection.
"""

from __future__ import annotations

import json
import os
import tempfile

from desmoe import checkpoint, discover, restrict
from desmoe.config import Config, ConfigError, load_config
from desmoe.data import DataError, build_domain_data, build_holdout, build_tokenizer, load_domain_examples
from desmoe.evaluation import HIGHER_IS_BETTER, evaluate_sets, markdown_table
from desmoe.export import export_run, load_pretrained, read_export_meta
from desmoe.rundir import load_run_config


def load_data_config(path: str) -> Config:
    """``desmoe eval --data CONFIG``: a run config whose data section is evaluated (labels resolved)."""
    try:
        cfg = discover.resolve_labels(load_config(path))
    except ConfigError as e:
        raise ConfigError([f"--data {path}: {p}" for p in e.problems], source=path) from e
    if discover.needs_discovery(cfg):
        raise ConfigError([f"--data {path}: its data.discover names no labels, so it has no domains to evaluate. "
                           "Give a config with data.domains, or set data.discover.labels to a discovered "
                           "records.jsonl."], source=path)
    return cfg


def restricted_table(unrestricted: dict, restricted: dict) -> str:
    """A markdown table: one row per domain, each metric unrestricted and restricted to its experts."""
    metrics = [m for m in HIGHER_IS_BETTER if any(m in r for r in restricted.values())]
    head = ["domain"] + [f"{m} {w}" for m in metrics for w in ("unrestricted", "restricted")]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for d, r in restricted.items():
        cells = [d]
        for m in metrics:
            cells += ["" if v is None else f"{v:.4f}" for v in (unrestricted.get(d, {}).get(m), r.get(m))]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def eval_run(run_dir: str, tag: str | None = None, *, out: str | None = None, data_config: str | None = None,
             restrict_to_domains: bool = False, coverage: float | None = None) -> dict:
    """Evaluate checkpoint ``tag`` (default: latest) of a run in this process.

    Writes ``eval_<tag>.json`` and ``eval_<tag>.md`` (with ``data_config``: ``eval_<tag>_<config name>.*``) in
    the run directory (or ``out``); returns {"checkpoint", "results", "table", "out", "file"}. With
    ``restrict_to_domains`` also ``eval_<tag>[_<config name>]_restricted.json/.md`` (every domain of the
    run's selection that the data has: its eval rows unrestricted and restricted to its own experts) and
    "restricted": {"results", "table", "file"}. With ``coverage`` (0 < C <= 1; needs ``restrict_to_domains``)
    each domain is restricted to the experts that hold C of its affinity per layer, topped up
    (desmoe.restrict.COVERAGE_RULE), in ``eval_<tag>[_<config name>]_restricted_cov<C>.json/.md``. Raises
    RunDirError, CheckpointError, ExportError, ConfigError, ModelError, DataError or DomainError on what a
    user can fix.
    """
    if coverage is not None and not restrict_to_domains:
        raise restrict.DomainError(f"--coverage {coverage} without --restrict-to-domains: the coverage chooses the "
                                   "experts each domain is restricted to. Add --restrict-to-domains.")
    coverage = restrict.check_coverage(coverage)
    run_dir = os.path.abspath(run_dir)
    cfg = load_run_config(run_dir)
    if restrict_to_domains and cfg.method.mode not in restrict.SELECTION_MODES:
        raise restrict.DomainError(restrict.no_selection_message(cfg.method.mode, "--restrict-to-domains"))
    tag, _ = checkpoint.resolve(run_dir, tag)
    if data_config is None:
        data_cfg = cfg.data
        loaded = load_domain_examples(cfg.data)
        tokenizer = build_tokenizer(cfg.data, cfg.model, loaded[0])
    else:
        # the run's tokenizer (trained on the run's own data when data.tokenizer is sentencepiece)
        own = load_domain_examples(cfg.data)[0] if cfg.data.tokenizer == "sentencepiece" else None
        tokenizer = build_tokenizer(cfg.data, cfg.model, own)
        data_cfg = load_data_config(data_config).data
        loaded = None
    try:
        domains, _ = build_domain_data(data_cfg, tokenizer, loaded)
        holdout = build_holdout(data_cfg, tokenizer)
    except DataError as e:
        if data_config is None:
            raise
        raise DataError(f"--data {data_config}: its data section cannot be evaluated: {e}") from e
    sets = dict(domains)
    if holdout is not None:
        sets["holdout"] = holdout
    with tempfile.TemporaryDirectory(prefix="desmoe-eval-") as tmp:
        export_run(run_dir, os.path.join(tmp, "model"), tag=tag)
        model = load_pretrained(os.path.join(tmp, "model")).float().eval()
        experts_of = None
        if restrict_to_domains:
            experts_of = restrict.read_domain_experts(os.path.join(tmp, "model"),
                                                      read_export_meta(os.path.join(tmp, "model")))
            experts_of = restrict.with_coverage(experts_of, coverage, where="--coverage")
    restricted_domains = []
    if experts_of is not None:
        restricted_domains = [d for d in domains if d in experts_of["domains"]]
        if not restricted_domains:
            raise restrict.DomainError(f"--restrict-to-domains: none of the evaluated domains ({', '.join(domains)}) "
                                       f"is one of the run's domains ({', '.join(experts_of['domains'])}), so none "
                                       "has experts to restrict to. Evaluate on data with the run's domains.")

    def forward(ids, attention_mask=None, position_ids=None):
        return model(input_ids=ids, attention_mask=attention_mask, position_ids=position_ids).logits

    results = evaluate_sets(forward, sets, tokenizer=tokenizer, batch_size=cfg.train.micro_batch_size,
                            max_new_tokens=cfg.eval.max_new_tokens, max_pairs=cfg.eval.max_pairs, model=model)
    out = out or run_dir
    os.makedirs(out, exist_ok=True)
    stem = f"eval_{tag}"
    if data_config is not None:
        stem += "_" + os.path.splitext(os.path.basename(data_config))[0]
    record = {"run_dir": run_dir, "checkpoint": tag, "results": results}
    if data_config is not None:
        record["data_config"] = os.path.abspath(data_config)
    with open(os.path.join(out, f"{stem}.json"), "w", encoding="utf-8") as f:
        json.dump(record, f, indent=2)
    table = markdown_table(None, results)
    on = f" on the data of {os.path.abspath(data_config)}" if data_config is not None else ""
    with open(os.path.join(out, f"{stem}.md"), "w", encoding="utf-8") as f:
        f.write(f"# Evaluation of {run_dir}, checkpoint {tag}{on}\n\n{table}\n")
    result = {"checkpoint": tag, "results": results, "table": table, "out": out,
              "file": os.path.join(out, f"{stem}.json")}
    if experts_of is None:
        return result
    restricted = {}
    for d in restricted_domains:
        restrict.restrict_to_domain(model, experts_of, d)
        restricted[d] = evaluate_sets(forward, {d: sets[d]}, tokenizer=tokenizer, batch_size=cfg.train.micro_batch_size,
                                      max_new_tokens=cfg.eval.max_new_tokens, max_pairs=cfg.eval.max_pairs,
                                      model=model)[d]
    restrict.restrict_to_domain(model, experts_of, None)
    table = restricted_table(results, restricted)
    record = {"run_dir": run_dir, "checkpoint": tag,
              "selection": {k: experts_of.get(k) for k in ("source", "step", "rule", "coverage")},
              "allowed": {d: experts_of["allowed"][d] for d in restricted},
              "layers": experts_of["layers"], "num_experts": experts_of["num_experts"],
              "domains": {d: {"unrestricted": results[d], "restricted": restricted[d]} for d in restricted}}
    if data_config is not None:
        record["data_config"] = os.path.abspath(data_config)
    stem += "_restricted" if coverage is None else f"_restricted_cov{coverage:g}"
    with open(os.path.join(out, f"{stem}.json"), "w", encoding="utf-8") as f:
        json.dump(record, f, indent=2)
    skipped = [d for d in domains if d not in restricted]
    note = f"\n\nNot restricted (not one of the run's domains): {', '.join(skipped)}." if skipped else ""
    rule = restrict.rule_name(experts_of)
    with open(os.path.join(out, f"{stem}.md"), "w", encoding="utf-8") as f:
        f.write(f"# Evaluation of {run_dir}, checkpoint {tag}{on}: each domain unrestricted and restricted to its "
                f"own experts ({rule})\n\nAllowed experts ({rule}): {experts_of['rule']} ({experts_of['source']})."
                f"\n\n{table}{note}\n")
    result["restricted"] = {"results": restricted, "table": table, "file": os.path.join(out, f"{stem}.json"),
                            "rule": rule, "coverage": coverage}
    return result
