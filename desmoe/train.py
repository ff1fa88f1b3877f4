"""The desmoe training recipe: one loop you can read top to bottom.

    python -m desmoe.train --config configs/demo.yaml [section.key=value ...]

Start it under a launcher for several ranks (``torchrun --nproc_per_node 2 -m desmoe.train``,
``deepspeed --num_gpus N --module desmoe.train``) or with ``desmoe train --nproc N``.

setup() builds config, ranks, model, data and the DeepSpeed engine; train() runs
micro-batch -> forward -> loss -> engine.backward -> engine.step -> log, then evaluates
and saves; cleanup() closes files and the process group.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import sys
import time
import typing

import torch

from desmoe import checkpoint, dist, faults
from desmoe.config import Config, ConfigError, dump_config, load_config, validate
from desmoe.data import (DataError, DomainData, DomainSampler, IGNORE_INDEX, build_domain_data, build_holdout,
                         build_tokenizer, load_domain_examples, real_token_mask)
from desmoe.models import (ModelError, build_tiny_model, get_family, load_pretrained_config, load_pretrained_model,
                           num_routed_experts)

USER_ERRORS = (ConfigError, ModelError, DataError, checkpoint.CheckpointError)


PHASE_INDEX = {"full": 0, "esft": 0, "warmup": 1, "stabilization": 2, "consolidation": 3}
"""The phase as a number, for metric plots (MLflow metrics are numeric)."""


class TrainingStopped(RuntimeError):
    """The run cannot go on (e.g. train.max_bad_steps non-finite steps in a row); exit code 3."""


class StepRecord(typing.NamedTuple):
    """One optimizer step, buffered until the next log interval."""

    step: int
    step_time_s: float
    elapsed_s: float
    lr: float
    extra: dict
    stats: torch.Tensor
    """[domains, 4] float64, this rank: task-loss sum, KD-loss sum, micro-batches, tokens."""


@dataclasses.dataclass
class Run:
    """Everything the loop needs, built by setup()."""

    cfg: Config
    output_dir: str
    rank: int
    world_size: int
    engine: object
    sampler: DomainSampler
    domains: dict[str, DomainData]
    ds_config: dict
    holdout: DomainData | None = None
    """data.holdout: evaluated, never trained (forgetting)."""
    method: object = None
    """DesMoE hooks and state in the desmoe modes; None in fft mode."""
    metrics_file: object = None
    tracker: object = None
    """desmoe.tracking.Tracker on rank 0 (a disabled one elsewhere or with tracking.mlflow: false)."""
    progress: object = None
    tokenizer: object = None
    expert_load: object = None
    """desmoe.router_stats.ExpertLoad: routed-token counts per expert, for tracking."""
    start_step: int = 0
    """The last step already done: 0, or the step of the checkpoint a resumed run loaded."""
    resumed: dict | None = None
    """This rank's desmoe state from that checkpoint (resumed runs)."""
    stop_at_step: int | None = None

    @property
    def master(self) -> bool:
        return self.rank == 0


def build_arg_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="desmoe train", description="Fine-tune an MoE model on several domains.")
    p.add_argument("--config", default=None, help="run YAML (see configs/); required unless --resume")
    p.add_argument("--output-dir", default=None, help="run directory (overrides run.output_dir)")
    p.add_argument("--resume", default=None, metavar="RUN_DIR",
                   help="continue the run in RUN_DIR from its latest complete checkpoint, with its config.yaml "
                        "(overrides still apply)")
    p.add_argument("--stop-at-step", type=int, default=None, metavar="N",
                   help="save a checkpoint at step N and stop (continue later with --resume); for jobs "
                        "shorter than the whole run")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. train.max_steps=20")
    return p


def resolve_config(args, world_size: int | None = None) -> tuple[Config, str]:
    """Config and run directory from CLI arguments; ConfigError on any problem (nothing written yet).

    ``world_size`` defaults to the launcher's WORLD_SIZE (1 without a launcher). With ``--resume RUN_DIR``
    the config is RUN_DIR/config.yaml (plus overrides) and the run directory is RUN_DIR."""
    if world_size is None:
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if args.resume is not None:
        return _resolve_resume(args, world_size)
    if args.config is None:
        raise ConfigError(["--config: missing. Give the run YAML (e.g. --config configs/demo.yaml), or --resume "
                           "RUN_DIR to continue a run."])
    if args.stop_at_step is not None and args.stop_at_step < 1:
        raise ConfigError([f"--stop-at-step: {args.stop_at_step} must be >= 1."])
    cfg = load_config(args.config, args.overrides)
    if args.output_dir is not None:
        cfg.run.output_dir = os.path.abspath(args.output_dir)
    output_dir = cfg.run.output_dir or os.path.abspath(os.path.join("runs", cfg.run.name))
    cfg.run.output_dir = output_dir
    validate(cfg, world_size=world_size)
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise ConfigError([f"run.output_dir: {output_dir!r} exists and is not a directory. Choose another "
                           "--output-dir."])
    taken = [f for f in ("config.yaml", "metrics.jsonl") if os.path.exists(os.path.join(output_dir, f))]
    if taken and not cfg.run.overwrite:
        raise ConfigError([f"run.output_dir: {output_dir} already holds a run ({', '.join(taken)}). Choose a new "
                           "--output-dir, or set run.overwrite=true to replace it."])
    return cfg, output_dir


def _resolve_resume(args, world_size: int) -> tuple[Config, str]:
    run_dir = os.path.abspath(args.resume)
    saved = os.path.join(run_dir, "config.yaml")
    if not os.path.isfile(saved):
        raise ConfigError([f"--resume {args.resume}: {saved} not found. Give the run directory of an earlier "
                           "run (it holds config.yaml, metrics.jsonl and checkpoints/)."])
    if args.config is not None:
        raise ConfigError([f"--config {args.config} with --resume: a resumed run uses {saved}. Drop --config "
                           "(overrides still apply)."])
    if args.output_dir is not None and os.path.abspath(args.output_dir) != run_dir:
        raise ConfigError([f"--output-dir {args.output_dir} with --resume {args.resume}: a run continues in its "
                           "own directory. Drop --output-dir."])
    cfg = load_config(saved, args.overrides)
    cfg.run.output_dir = run_dir
    validate(cfg, world_size=world_size)
    root, tag = checkpoint.find_resumable(run_dir, world_size)
    step = checkpoint.step_of(tag)
    if step >= cfg.train.max_steps:
        raise ConfigError([f"--resume {args.resume}: its checkpoint {tag} is at step {step}, train.max_steps is "
                           f"{cfg.train.max_steps}: nothing left to train."])
    if args.stop_at_step is not None and not step < args.stop_at_step:
        raise ConfigError([f"--stop-at-step: {args.stop_at_step} must be after the checkpoint's step {step}."])
    return cfg, run_dir


def preflight(cfg: Config) -> None:
    """Checks that need no ranks: the model source and every data file. Raises the user errors."""
    if cfg.model.path is not None:
        load_pretrained_config(cfg.model.path, trust_remote_code=cfg.model.trust_remote_code)
    examples, _ = load_domain_examples(cfg.data)
    if cfg.data.tokenizer == "sentencepiece":
        from desmoe.data import train_sentencepiece

        train_sentencepiece(cfg.data, examples)  # once, before the ranks start


def fit_tiny_vocab(cfg: Config, tokenizer) -> None:
    """A tiny model whose config does not set vocab_size gets one that fits the tokenizer."""
    tiny = cfg.model.tiny
    if tiny is not None and "vocab_size" not in tiny:
        from desmoe.models import tiny_config_kwargs

        _, kwargs = tiny_config_kwargs(tiny)
        if tokenizer.vocab_size > kwargs["vocab_size"]:
            tiny["vocab_size"] = -(-tokenizer.vocab_size // 64) * 64


def build_model(cfg: Config):
    if cfg.model.tiny is not None:
        return build_tiny_model(cfg.model.tiny, seed=cfg.run.seed)
    return load_pretrained_model(cfg.model.path, trust_remote_code=cfg.model.trust_remote_code)


def setup(args) -> Run:
    cfg, output_dir = resolve_config(args)
    dist.init_distributed(cfg.parallel.backend, cfg.parallel.timeout_s)
    world_size, rank = dist.get_world_size_and_rank()
    check_same_config(cfg, rank, world_size)
    torch.manual_seed(cfg.run.seed)

    loaded = load_domain_examples(cfg.data)  # every file read once, here
    # rank 0 trains a sentencepiece model if one is needed and not cached; the others then load it
    if rank == 0:
        tokenizer = build_tokenizer(cfg.data, cfg.model, loaded[0])
    dist.barrier()
    if rank != 0:
        tokenizer = build_tokenizer(cfg.data, cfg.model, loaded[0])
    fit_tiny_vocab(cfg, tokenizer)
    model = build_model(cfg)
    family = get_family(model.config.model_type)
    validate(cfg, world_size=world_size, num_experts=num_routed_experts(model.config, family))

    vocab = model.get_input_embeddings().weight.shape[0]
    if tokenizer.vocab_size > vocab:
        raise ConfigError([f"data.tokenizer: the tokenizer has {tokenizer.vocab_size} ids but the model's "
                           f"embedding has {vocab} rows. Use the model's own tokenizer or a model with "
                           f"vocab_size >= {tokenizer.vocab_size}."])
    domains, scan = build_domain_data(cfg.data, tokenizer, loaded)
    holdout = build_holdout(cfg.data, tokenizer)

    from desmoe.engine import build_ds_config, build_engine
    from desmoe.method import METHOD_STATE_MODES, DesMoE
    from desmoe.models import moe_layer_indices

    method = None
    if cfg.method.mode in METHOD_STATE_MODES:
        method = DesMoE(cfg, model, moe_layer_indices(model.config, family), list(domains))
    ds_config = build_ds_config(cfg, family, model.config)
    if rank == 0:
        check_output_dir(output_dir, checkpoint_bytes(model))
    resume = None
    if args.resume is not None:
        root, tag = checkpoint.find_resumable(output_dir, world_size)
        resume = (root, tag, checkpoint.step_of(tag))
    dist.barrier()  # every rank has passed every check before rank 0 writes anything
    if rank == 0:
        os.makedirs(output_dir, exist_ok=True)
        write_run_config(output_dir, dump_config(cfg), resumed_at=resume[2] if resume else None)
        with open(os.path.join(output_dir, "ds_config.json"), "w", encoding="utf-8") as f:
            json.dump(ds_config, f, indent=2)
    if method is not None:
        engine = build_engine(model, ds_config, cfg.train, param_groups=method.param_groups(model),
                              lr_factor=method.lr_factor)
        method.attach(engine)
        method.output_dir = output_dir
    else:
        engine = build_engine(model, ds_config, cfg.train)
    dist.apply_timeout(cfg.parallel.timeout_s)  # the expert-parallel groups DeepSpeed just made, too
    sampler = DomainSampler(domains, micro_batch_size=cfg.train.micro_batch_size, seed=cfg.run.seed, rank=rank,
                            world_size=world_size, sync_domains=cfg.data.sync_domains)
    run = Run(cfg=cfg, output_dir=output_dir, rank=rank, world_size=world_size, engine=engine, sampler=sampler,
              domains=domains, ds_config=ds_config, holdout=holdout, method=method, stop_at_step=args.stop_at_step,
              tokenizer=tokenizer)
    if resume is not None:
        load_checkpoint(run, *resume)
    if rank == 0:
        run.metrics_file = open_metrics(output_dir, run.start_step)
        run.tracker = start_tracking(cfg, ds_config, output_dir, resumed=resume is not None)
    else:
        from desmoe.tracking import Tracker

        run.tracker = Tracker()
    if cfg.tracking.mlflow:
        from desmoe.engine import autoep_layers
        from desmoe.router_stats import ExpertLoad

        run.expert_load = ExpertLoad(autoep_layers(engine.module))
    if rank == 0:
        table, rows = data_summary(domains, scan)
        print(table, flush=True)
        with open(os.path.join(output_dir, "data_summary.json"), "w", encoding="utf-8") as f:
            json.dump(rows, f, indent=2)
    if method is not None and method.esft and resume is None:
        selection = method.profile_esft(domains, micro_batch_size=cfg.train.micro_batch_size, rank=rank,
                                        world_size=world_size, output_dir=output_dir)
        if rank == 0:
            print("ESFT experts trained per MoE layer: " + "; ".join(
                f"layer {l}: {e}" for l, e in zip(method.moe_layers, selection["trained_union"])), flush=True)
    return run


def start_tracking(cfg: Config, ds_config: dict, output_dir: str, resumed: bool):
    from desmoe.tracking import Tracker

    if not cfg.tracking.mlflow:
        return Tracker()
    return Tracker.start(cfg.to_dict(), ds_config, output_dir=output_dir, run_name=cfg.run.name, uri=cfg.tracking.uri,
                         experiment=cfg.tracking.experiment, resume=resumed, tags={"desmoe.mode": cfg.method.mode})


def check_same_config(cfg: Config, rank: int, world_size: int) -> None:
    """Every rank must run the same resolved config (launchers on several nodes read their own files)."""
    import hashlib

    digest = hashlib.sha256(dump_config(cfg).encode()).hexdigest()
    gathered = dist.all_gather_objects(digest) if world_size > 1 else [digest]
    differ = [r for r, d in enumerate(gathered) if d != gathered[0]]
    if differ:
        raise ConfigError([f"rank(s) {differ} resolved a different configuration than rank 0 (config file, overrides "
                           "or paths differ between nodes). Give every node the same files and arguments."])


def checkpoint_bytes(model) -> int:
    """Estimated size of one checkpoint: fp32 weights, master copy and Adam's two moments (16 bytes per
    parameter), plus 10%."""
    return int(sum(p.numel() for p in model.parameters()) * 16 * 1.1)


def check_output_dir(output_dir: str, need: int) -> None:
    """The run directory can be created and written, and its file system has ``need`` bytes free."""
    import shutil

    parent = output_dir
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError([f"run.output_dir: {output_dir} cannot be created or written ({parent} is not writable). "
                           "Choose another --output-dir."])
    free = shutil.disk_usage(parent).free
    if free < need:
        raise ConfigError([f"run.output_dir: {parent} has {free / 2**20:,.0f} MiB free; one checkpoint needs about "
                           f"{need / 2**20:,.0f} MiB. Free space or choose another --output-dir."])


def write_run_config(output_dir: str, text: str, resumed_at: int | None) -> None:
    """config.yaml of the run; a resumed run with other settings keeps the earlier one beside it."""
    path = os.path.join(output_dir, "config.yaml")
    if resumed_at is not None and os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            old = f.read()
        if old == text:
            return
        os.replace(path, os.path.join(output_dir, f"config.before_resume_step{resumed_at}.yaml"))
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


def open_metrics(output_dir: str, start_step: int):
    """metrics.jsonl for appending. A resumed run keeps the lines up to its checkpoint's step and moves
    later ones (steps it will repeat) to metrics.discarded.jsonl."""
    path = os.path.join(output_dir, "metrics.jsonl")
    if start_step == 0 or not os.path.isfile(path):
        return open(path, "w", encoding="utf-8")
    keep, drop = [], []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                step = json.loads(line)["step"]
            except (ValueError, KeyError, TypeError):
                drop.append(line if line.endswith("\n") else line + "\n")  # a line cut by a kill
                continue
            (keep if step <= start_step else drop).append(line)
    if drop:
        with open(os.path.join(output_dir, "metrics.discarded.jsonl"), "a", encoding="utf-8") as f:
            f.writelines(drop)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(keep)
    os.replace(tmp, path)
    return open(path, "a", encoding="utf-8")


def checkpoint_state(run: Run, step: int, elapsed_s: float, eval_before: dict, history: list, best: dict | None) -> dict:
    """This rank's desmoe state saved beside the DeepSpeed checkpoint."""
    return {"step": step, "world_size": run.world_size, "elapsed_s": elapsed_s, "sampler": run.sampler.state_dict(),
            "rng": checkpoint.rng_state(), "eval_before": eval_before, "eval_history": history, "eval_best": best,
            "method": run.method.state_dict() if run.method is not None else None}


def save_checkpoint(run: Run, step: int, elapsed_s: float, eval_before: dict, history: list,
                    best: dict | None) -> str:
    state = checkpoint_state(run, step, elapsed_s, eval_before, history, best)
    path = checkpoint.save(run.engine, run.output_dir, step, state, keep=run.cfg.checkpoint.keep, rank=run.rank)
    if run.master:
        print(f"checkpoint: {path}", flush=True)
    return path


def load_checkpoint(run: Run, root: str, tag: str, step: int) -> None:
    """Weights, optimizer, LR schedule (DeepSpeed) and desmoe's state of ``tag``: the loop continues at step + 1."""
    checkpoint.use_safe_loading(run.engine, trust_pickle=run.cfg.checkpoint.trust_pickle)
    load_path, _ = run.engine.load_checkpoint(root, tag=tag, load_optimizer_states=True,
                                              load_lr_scheduler_states=True)
    if load_path is None:
        raise checkpoint.CheckpointError(f"--resume: DeepSpeed could not load {os.path.join(root, tag)}.")
    state = checkpoint.load_state(os.path.join(root, tag), run.rank)
    run.sampler.load_state_dict(state["sampler"])
    if run.method is not None:
        run.method.load_state_dict(state["method"])
    checkpoint.set_rng_state(state["rng"])
    run.start_step, run.resumed = step, state
    if run.master:
        print(f"resumed from {os.path.join(root, tag)} at step {step}", flush=True)


def data_summary(domains: dict[str, DomainData], scan: dict) -> tuple[str, list[dict]]:
    """The scan table printed before training (and its rows, saved as data_summary.json).

    ``truncated`` / ``split`` count the examples longer than data.seq_len (cut, or continued over
    rows: whichever data.long_examples does); ``dropped_tokens`` the tokens truncation cut off.
    """
    rows = [{"domain": d.name, "examples": d.examples, "tokens": d.tokens, "trained_tokens": d.trained_tokens,
             "truncated": d.truncated, "split": d.split, "dropped_tokens": d.dropped_tokens,
             "skipped": scan[d.name].skipped, "train_seqs": d.train_ids.shape[0], "eval_seqs": d.eval_ids.shape[0],
             "eval_examples": len(d.eval_examples), "metrics": list(d.metrics),
             "first_skipped": scan[d.name].first_skip} for d in domains.values()]
    lines = [f"{'domain':<12} {'examples':>9} {'tokens':>10} {'trained':>10} {'truncated':>9} {'split':>6} "
             f"{'skipped':>8} {'train seqs':>11} {'eval seqs':>10}  metric"]
    for r in rows:
        lines.append(f"{r['domain']:<12} {r['examples']:>9} {r['tokens']:>10} {r['trained_tokens']:>10} "
                     f"{r['truncated']:>9} {r['split']:>6} {r['skipped']:>8} {r['train_seqs']:>11} "
                     f"{r['eval_seqs']:>10}  {r['metrics'][0]}")
    mixed = scan.get("data.train")
    if mixed is not None and mixed.skipped:
        rows.append({"domain": "data.train", "skipped": mixed.skipped, "first_skipped": mixed.first_skip})
    for r in rows:
        if r.get("dropped_tokens"):
            lines.append(f"{r['domain']}: truncation to data.seq_len dropped {r['dropped_tokens']} token(s) of "
                         f"{r['truncated']} example(s)")
        if r["skipped"]:
            lines.append(f"{r['domain']}: skipped {r['skipped']} bad record(s); first: {r['first_skipped']}")
    return "\n".join(lines), rows


def device_of(engine) -> torch.device:
    return next(engine.module.parameters()).device


def evaluate(run: Run) -> dict[str, dict[str, float]]:
    """Every domain's and data.holdout's eval metrics over all ranks (desmoe.evaluation.evaluate_sets)."""
    from desmoe.evaluation import evaluate_sets

    engine, dev = run.engine, device_of(run.engine)
    sets = dict(run.domains)
    if run.holdout is not None:
        sets["holdout"] = run.holdout

    def forward(ids, attention_mask=None, position_ids=None):
        return engine(input_ids=ids, attention_mask=attention_mask, position_ids=position_ids).logits

    engine.eval()
    try:
        return evaluate_sets(forward, sets, tokenizer=run.tokenizer, rank=run.rank, world_size=run.world_size,
                             batch_size=run.cfg.train.micro_batch_size, max_new_tokens=run.cfg.eval.max_new_tokens,
                             max_pairs=run.cfg.eval.max_pairs, device=dev)
    finally:
        engine.train()


def losses_of(results: dict[str, dict[str, float]]) -> dict[str, float]:
    return {k: v["loss"] for k, v in results.items()}


def write_eval(run: Run, before: dict, after: dict | None, history: list[dict]) -> None:
    """eval.json (before, after, periodic history) and eval.md (the table) in the run directory (rank 0)."""
    from desmoe.evaluation import markdown_table

    if not run.master:
        return
    with open(os.path.join(run.output_dir, "eval.json"), "w", encoding="utf-8") as f:
        json.dump({"before": before, "after": after, "history": history}, f, indent=2)
    text = f"# Evaluation of {run.output_dir}\n\n"
    text += markdown_table(before, after) if after is not None else markdown_table(None, before)
    if history:
        text += "\n\n## During training\n\n| step | mean domain loss |\n|---|---|\n"
        text += "\n".join(f"| {h['step']} | {h['mean_loss']:.4f} |" for h in history)
    with open(os.path.join(run.output_dir, "eval.md"), "w", encoding="utf-8") as f:
        f.write(text + "\n")


def log_steps(run: Run, pending: list[StepRecord]) -> None:
    """Sum the buffered steps' stats over ranks, append them to metrics.jsonl, print a progress line."""
    cfg, names = run.cfg, list(run.domains)
    stacked = dist.all_reduce_sum(torch.stack([p.stats for p in pending]))  # [steps, domains, 4]
    load = run.expert_load.collect() if run.expert_load is not None else None  # [L, E] shares, all ranks
    if not run.master:
        return
    tracked = []
    for rec, stats in zip(pending, stacked):
        tokens = int(stats[:, 3].sum())
        values = {"lr": rec.lr, "lambda": rec.extra["lambda"], "tokens_per_s": tokens / rec.step_time_s,
                  "step_time_s": rec.step_time_s, "phase_index": PHASE_INDEX.get(rec.extra["phase"], -1),
                  "skipped_step": float(rec.extra.get("skipped_step", False))}
        for j, name in enumerate(names):
            n = stats[j, 2]
            if n > 0:
                record = {"step": rec.step, "domain": name, "loss": _finite_or_none(stats[j, 0] / n),
                          "kd_loss": _finite_or_none(stats[j, 1] / n), **rec.extra, "lr": rec.lr, "tokens": tokens,
                          "tokens_per_s": tokens / rec.step_time_s, "step_time_s": rec.step_time_s,
                          "elapsed_s": rec.elapsed_s, "mode": cfg.method.mode}
                run.metrics_file.write(json.dumps(record) + "\n")
                values[f"loss/{name}"] = float(stats[j, 0] / n)
                values[f"kd_loss/{name}"] = float(stats[j, 1] / n)
        tracked.append((rec.step, values))
    run.metrics_file.flush()
    last, stats = pending[-1], stacked[-1]
    if load is not None:
        from desmoe.router_stats import load_metrics

        tracked[-1][1].update(load_metrics(load, run.method.moe_layers if run.method is not None else
                                           list(range(load.shape[0]))))
    run.tracker.log_many(tracked)
    losses = {names[j]: float(stats[j, 0] / stats[j, 2]) for j in range(len(names)) if stats[j, 2] > 0}
    run.progress.update(last.step, phase=last.extra["phase"], losses=losses, lr=last.lr,
                        tokens_per_s=float(stats[:, 3].sum()) / last.step_time_s)


def train(run: Run) -> dict:
    cfg, engine = run.cfg, run.engine
    names = list(run.domains)
    dev = device_of(engine)
    from desmoe.evaluation import flat_metrics

    if run.resumed is None:
        eval_before = evaluate(run)
        elapsed_before, history, best = 0.0, [], None
    else:  # the base model's results, measured when the run started
        eval_before, elapsed_before = run.resumed["eval_before"], run.resumed["elapsed_s"]
        history, best = run.resumed["eval_history"], run.resumed["eval_best"]
    loss_before = losses_of(eval_before)
    if run.master:
        print(f"loss before training: {_fmt_losses(loss_before)}", flush=True)
        run.tracker.log_metrics(flat_metrics(eval_before, "eval_before"), run.start_step)
    from desmoe.progress import Progress

    if run.master:  # only rank 0 reports progress
        run.progress = Progress(cfg.train.max_steps, start_step=run.start_step, every=cfg.train.log_every)
    method = run.method
    t_start = time.perf_counter() - elapsed_before
    last_step = cfg.train.max_steps if run.stop_at_step is None else min(run.stop_at_step, cfg.train.max_steps)
    every = cfg.checkpoint.every
    pending: list[StepRecord] = []  # steps not yet logged
    bad_in_row = bad_total = 0  # skipped non-finite steps
    for step in range(run.start_step + 1, last_step + 1):
        t0 = time.perf_counter()
        updates = len(method.history) if method is not None else 0
        if method is not None:
            method.begin_step(step)  # phase, lambda
        # per domain, this rank: [task loss, KD loss] sums on the device (read once per step),
        # [micro-batches, tokens] on the host
        losses = torch.zeros(len(names), 2, device=dev)
        counts = torch.zeros(len(names), 2, dtype=torch.float64)
        skipped_before = engine.skipped_steps
        lr = max(engine.get_lr())  # this step's LR (of the groups that train now: a phase sets frozen groups' to 0)
        for _ in range(cfg.train.grad_accum_steps):
            domain, ids, labels = run.sampler.next_batch()
            if method is not None:
                # gradient masks of this domain's experts; the affinity counts real tokens, not padding
                method.begin_micro_batch(domain, real_token_mask(ids, labels, run.tokenizer.pad_id))
            out = engine(input_ids=ids.to(dev), labels=labels.to(dev))
            if faults.active("nan_loss", step):
                out.loss = out.loss * float("nan")
            aux = method.aux_loss() if method is not None else None  # lambda * L_KD (router only)
            engine.backward(out.loss if aux is None else out.loss + aux)
            boundary = engine.is_gradient_accumulation_boundary()
            if method is not None and boundary:
                method.before_optimizer_step()  # save rows that must not move
            engine.step()
            if method is not None and boundary:
                method.after_optimizer_step()
            j = names.index(domain)
            losses[j, 0] += out.loss.detach().float()
            kd = method.last_kd() if method is not None else None
            if kd is not None:
                losses[j, 1] += kd.float()
            counts[j, 0] += 1
            counts[j, 1] += (labels != IGNORE_INDEX).sum().item()
        bad = engine.skipped_steps > skipped_before
        if bad:
            # DeepSpeed found a non-finite gradient on some rank and skipped the update on every rank;
            # the LR schedule still follows the step count (phases are tied to it).
            engine.lr_scheduler.step()
            bad_in_row += 1
            bad_total += 1
        else:
            bad_in_row = 0
        if method is not None:
            method.end_step(step, run.output_dir)  # affinity EMA and masks every T_update steps
            if run.master and len(method.history) != updates:
                from desmoe.router_stats import domain_overlap

                run.tracker.log_metrics(domain_overlap(method.masks, method.domains), step)
        stats = torch.cat([losses.double().cpu(), counts], dim=1)
        now = time.perf_counter()
        extra = method.metrics() if method is not None else {"phase": "full", "lambda": 0.0}
        if bad:
            extra = {**extra, "skipped_step": True}
        pending.append(StepRecord(step, now - t0, now - t_start, lr, extra, stats))
        save_now = (every and step % every == 0) or step == run.stop_at_step or (
            step == cfg.train.max_steps and cfg.checkpoint.save_final)
        if step % cfg.train.log_every == 0 or step == last_step or save_now:
            # NOTE: one all-reduce per log interval, not per step: the logged numbers are the
            # same (every rank's losses and tokens), the collectives far fewer.
            log_steps(run, pending)
            pending = []
        if bad:
            if pending:
                log_steps(run, pending)
                pending = []
            check_bad_steps(run, step, bad_in_row, bad_total)
        if cfg.eval.every and step % cfg.eval.every == 0 and step != cfg.train.max_steps:
            best = periodic_eval(run, step, eval_before, history, best)
        if save_now:  # metrics.jsonl is complete up to this step
            save_checkpoint(run, step, time.perf_counter() - t_start, eval_before, history, best)

    if last_step < cfg.train.max_steps:
        if run.master:
            print(f"stopped at step {last_step} (--stop-at-step); continue with: desmoe train --resume "
                  f"{run.output_dir}", flush=True)
        return {"output_dir": run.output_dir, "steps": last_step, "stopped_at_step": last_step}
    eval_after = evaluate(run)
    loss_after = losses_of(eval_after)
    write_eval(run, eval_before, eval_after, history)
    summary = {"output_dir": run.output_dir, "steps": cfg.train.max_steps, "mode": cfg.method.mode,
               "world_size": run.world_size, "ep_size": cfg.parallel.ep_size,
               "train_time_s": time.perf_counter() - t_start, "eval_loss_before": loss_before,
               "eval_loss_after": loss_after, "eval_before": eval_before, "eval_after": eval_after,
               "best": best}
    if run.master:
        with open(os.path.join(run.output_dir, "summary.json"), "w", encoding="utf-8") as f:
            json.dump(summary, f, indent=2)
        print(f"run directory: {run.output_dir}")
        print(f"{'domain':<12} {'loss before':>12} {'loss after':>11}")
        for n in loss_before:
            print(f"{n:<12} {loss_before[n]:>12.4f} {loss_after[n]:>11.4f}")
        run.tracker.log_metrics(flat_metrics(eval_after, "eval_after"), cfg.train.max_steps)
        for name in ("summary.json", "data_summary.json", "esft_selection.json", "eval.json", "eval.md", "affinity"):
            if os.path.exists(os.path.join(run.output_dir, name)):
                run.tracker.log_artifact(os.path.join(run.output_dir, name),
                                         artifact_path=name if name == "affinity" else None)
    return summary


def check_bad_steps(run: Run, step: int, in_row: int, total: int) -> None:
    """Report a skipped non-finite step; TrainingStopped after train.max_bad_steps in a row."""
    if run.master:
        run.progress.write(f"warning: step {step}: non-finite loss or gradient; the update was skipped "
                           f"({in_row} in a row, {total} in all)")
    limit = run.cfg.train.max_bad_steps
    if in_row >= limit:
        last = checkpoint.latest_tag(os.path.join(run.output_dir, checkpoint.CHECKPOINTS))
        raise TrainingStopped(
            f"{in_row} steps in a row (to step {step}) had a non-finite loss or gradient (train.max_bad_steps="
            f"{limit}); stopped. Last complete checkpoint: {last or 'none'} in {run.output_dir}/checkpoints. "
            "Lower train.lr, check the data of these steps, or raise train.max_bad_steps.")


def periodic_eval(run: Run, step: int, eval_before: dict, history: list, best: dict | None) -> dict | None:
    """eval.every: evaluate, record in eval.json and MLflow, keep the best weights (eval.keep_best);
    returns the best evaluation so far. Every rank calls it."""
    from desmoe.evaluation import flat_metrics, is_better, select_value

    cfg, names = run.cfg, list(run.domains)
    results = evaluate(run)
    value = select_value(results, names, cfg.eval.best_metric)
    history.append({"step": step, "mean_loss": select_value(results, names, "loss"), cfg.eval.best_metric: value,
                    "results": results})
    if run.master:
        run.tracker.log_metrics(flat_metrics(results, "eval"), step)
        run.progress.write(f"eval at step {step}: {_fmt_losses(losses_of(results))}")
        write_eval(run, eval_before, None, history)
    if cfg.eval.keep_best and value is not None and is_better(cfg.eval.best_metric, value, best and best["value"]):
        best = {"step": step, "metric": cfg.eval.best_metric, "value": value}
        checkpoint.save_best(run.engine, run.output_dir, best, rank=run.rank)
    return best


def _finite_or_none(x: torch.Tensor) -> float | None:
    """metrics.jsonl stays strict JSON: a non-finite value is written as null."""
    v = float(x)
    return v if math.isfinite(v) else None


def _fmt_losses(losses: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.4f}" for k, v in losses.items())


def close_files(run: Run | None, status: str) -> None:
    """Close metrics.jsonl, the progress display and the MLflow run (``status``: FINISHED / FAILED / KILLED)."""
    if run is None:
        return
    if run.progress is not None:
        run.progress.close()
    if run.metrics_file is not None and not run.metrics_file.closed:
        run.metrics_file.close()
    if run.tracker is not None:
        run.tracker.finish(status)


def cleanup(run: Run | None) -> None:
    close_files(run, "FINISHED")
    dist.barrier()
    dist.destroy()


def quiet_libraries() -> None:
    """DeepSpeed and transformers log every rank's set-up at INFO; keep warnings and errors."""
    import warnings

    warnings.filterwarnings("ignore", message=r".*all_gather_into_tensor.* is deprecated", category=FutureWarning)
    # "DeepSpeed" is deepspeed.utils.logger's name
    for name in ("DeepSpeed", "deepspeed", "transformers", "torch.distributed"):
        logging.getLogger(name).setLevel(logging.WARNING)


def report_user_error(err: Exception) -> int:
    """Print a user error once (rank 0 of the launch) and return exit code 2."""
    if os.environ.get("RANK", "0") == "0":
        print(f"desmoe: error: {err}", file=sys.stderr, flush=True)
    return 2


def main(argv: list[str] | None = None) -> int:
    code = _main(argv)
    codes = os.environ.get("DESMOE_EXIT_CODE_DIR")
    if codes and code != 0:  # started by `desmoe train --nproc N`, which exits with this code
        with open(os.path.join(codes, f"rank{os.environ.get('RANK', '0')}"), "w") as f:
            f.write(str(code))
        return 0
    return code


def _main(argv: list[str] | None = None) -> int:
    args = build_arg_parser().parse_args(argv)
    dist.setup_env()
    quiet_libraries()
    run = None
    try:
        run = setup(args)
        train(run)
    except USER_ERRORS as e:
        # Every rank sees the same config and data, so every rank stops here together.
        dist.destroy()
        return report_user_error(e)
    except TrainingStopped as e:
        # every rank decides alike (the skipped steps are the same on every rank)
        close_files(run, "FAILED")
        dist.destroy()
        if os.environ.get("RANK", "0") == "0":
            print(f"desmoe: stopped: {e}", file=sys.stderr, flush=True)
        return 3
    except KeyboardInterrupt:
        close_files(run, "KILLED")
        raise
    except BaseException:
        close_files(run, "FAILED")  # metrics.jsonl is flushed at every log interval; MLflow learns the run failed
        raise
    cleanup(run)
    return 0


if __name__ == "__main__":
    exit_code = main()
    # NOTE: leave without interpreter finalization: gloo's worker threads can still hold tensors
    # after destroy_process_group, and tearing them down during finalization aborts (SIGABRT) now
    # and then (pytorch/pytorch#190489), turning a finished run into a failed job.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(exit_code)
