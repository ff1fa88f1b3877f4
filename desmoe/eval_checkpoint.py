"""``desmoe eval``: evaluate one checkpoint of a finished (or stopped) run, in this process.

The checkpoint is exported (desmoe.export: experts of every EP rank gathered, adaptive routers
attached) into a temporary directory, loaded back, and evaluated (desmoe.evaluation) on the run's
own eval rows and data.holdout.
"""

from __future__ import annotations

import json
import os
import tempfile

from desmoe import checkpoint
from desmoe.data import build_domain_data, build_holdout, build_tokenizer, load_domain_examples
from desmoe.evaluation import evaluate_sets, markdown_table
from desmoe.export import export_run, load_pretrained
from desmoe.rundir import load_run_config


def eval_run(run_dir: str, tag: str | None = None, *, out: str | None = None) -> dict:
    """Evaluate checkpoint ``tag`` (default: latest) of a run in this process.

    Writes ``eval_<tag>.json`` and ``eval_<tag>.md`` in the run directory (or ``out``); returns
    {"checkpoint", "results", "table", "out"}. Raises RunDirError, CheckpointError, ExportError,
    ConfigError, ModelError or DataError on what a user can fix.
    """
    run_dir = os.path.abspath(run_dir)
    cfg = load_run_config(run_dir)
    tag, _ = checkpoint.resolve(run_dir, tag)
    loaded = load_domain_examples(cfg.data)
    tokenizer = build_tokenizer(cfg.data, cfg.model, loaded[0])
    domains, _ = build_domain_data(cfg.data, tokenizer, loaded)
    sets = dict(domains)
    holdout = build_holdout(cfg.data, tokenizer)
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
    with open(os.path.join(out, f"eval_{tag}.json"), "w", encoding="utf-8") as f:
        json.dump({"run_dir": run_dir, "checkpoint": tag, "results": results}, f, indent=2)
    table = markdown_table(None, results)
    with open(os.path.join(out, f"eval_{tag}.md"), "w", encoding="utf-8") as f:
        f.write(f"# Evaluation of {run_dir}, checkpoint {tag}\n\n{table}\n")
    return {"checkpoint": tag, "results": results, "table": table, "out": out}
