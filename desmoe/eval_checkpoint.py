"""``desmoe eval``: evaluate one checkpoint of a finished (or stopped) run, in this process.

The checkpoint is exported (desmoe.export: experts of every EP rank gathered, adaptive routers
attached) into a temporary directory, loaded back, and evaluated (desmoe.evaluation) on the run's
own eval rows and data.holdout, or (``data_config``) on another config's data section: its domains, eval
rows and holdout, tokenised with the run's own tokenizer (e.g. a run trained on discovered domains evaluated
on the true domains' held-out sets).
"""

from __future__ import annotations

import json
import os
import tempfile

from desmoe import checkpoint, discover
from desmoe.config import Config, ConfigError, load_config
from desmoe.data import DataError, build_domain_data, build_holdout, build_tokenizer, load_domain_examples
from desmoe.evaluation import evaluate_sets, markdown_table
from desmoe.export import export_run, load_pretrained
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


def eval_run(run_dir: str, tag: str | None = None, *, out: str | None = None, data_config: str | None = None) -> dict:
    """Evaluate checkpoint ``tag`` (default: latest) of a run in this process.

    Writes ``eval_<tag>.json`` and ``eval_<tag>.md`` (with ``data_config``: ``eval_<tag>_<config name>.*``) in
    the run directory (or ``out``); returns {"checkpoint", "results", "table", "out", "file"}. Raises
    RunDirError, CheckpointError, ExportError, ConfigError, ModelError or DataError on what a user can fix.
    """
    run_dir = os.path.abspath(run_dir)
    cfg = load_run_config(run_dir)
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
    return {"checkpoint": tag, "results": results, "table": table, "out": out,
            "file": os.path.join(out, f"{stem}.json")}
