"""The desmoe training recipe: one loop you can read top to bottom.

    python -m desmoe.train --config configs/demo.yaml [section.key=value ...]

Start it under a launcher for several ranks (``torchrun --nproc_per_node 2 -m desmoe.train``,
``deepspeed --num_gpus N --module desmoe.train``) or with ``desmoe train --nproc N``.

setup() builds config, ranks, model, data, the method and the DeepSpeed engine; train() runs
micro-batch -> forward -> loss -> engine.backward -> engine.step -> log, then evaluates and
saves. The method (DES-MoE, ESFT, or nothing for full fine-tuning) is called through the same
hooks in every mode. Arguments, checks and exit codes: desmoe/launch.py; the run directory's
files: desmoe/rundir.py; step logging: desmoe/steplog.py; checkpoints: desmoe/checkpoint.py.
"""

from __future__ import annotations

import dataclasses
import os
import time

import torch

from desmoe import affinity_report, checkpoint, discover, dist, esft, faults, launch, reshard, rundir
from desmoe.config import Config, ConfigError, dump_config, validate
from desmoe.constants import IGNORE_INDEX
from desmoe.data import (DomainData, DomainSampler, build_domain_data, build_holdout, build_tokenizer,
                         load_domain_examples, real_token_mask)
from desmoe.engine import autocast, autoep_layers, build_ds_config, build_engine
from desmoe.evaluation import evaluate_sets, flat_metrics, is_better, select_value
from desmoe.method import build_method
from desmoe.models import build_tiny_model, get_family, load_pretrained_model, num_routed_experts, tiny_config_kwargs
from desmoe.router_stats import ExpertLoad, domain_overlap
from desmoe.steplog import BadSteps, StepLog, StepRecord
from desmoe.tracking import Tracker


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
    method: object
    """desmoe.method: DesMoE hooks and state, or FullFineTuning (does nothing) in fft mode."""
    tokenizer: object
    holdout: DomainData | None = None
    """data.holdout: evaluated, never trained (forgetting)."""
    tracker: Tracker = dataclasses.field(default_factory=Tracker)
    """MLflow on rank 0 (a disabled one elsewhere or with tracking.mlflow: false)."""
    log: StepLog | None = None
    figures: rundir.FigureWriter | None = None
    """Rank 0: draws the affinity heatmaps in a child process (training does not wait for them)."""
    start_step: int = 0
    """The last step already done: 0, or the step of the checkpoint a resumed run loaded."""
    resumed: dict | None = None
    """This rank's desmoe state from that checkpoint (resumed runs)."""
    stop_at_step: int | None = None

    @property
    def master(self) -> bool:
        return self.rank == 0

    def close(self, status: str) -> None:
        """Close metrics.jsonl, the progress display and the MLflow run (``status``: FINISHED / FAILED / KILLED)."""
        if self.log is not None:
            self.log.close()
        if self.figures is not None:
            self.figures.close()
        self.tracker.finish(status)


# ---- setup -----------------------------------------------------------------------------------


def fit_tiny_vocab(cfg: Config, tokenizer) -> None:
    """A tiny model whose config does not set vocab_size gets one that fits the tokenizer."""
    tiny = cfg.model.tiny
    if tiny is not None and "vocab_size" not in tiny:
        _, kwargs = tiny_config_kwargs(tiny)
        if tokenizer.vocab_size > kwargs["vocab_size"]:
            tiny["vocab_size"] = -(-tokenizer.vocab_size // 64) * 64


def build_model(cfg: Config):
    if cfg.model.tiny is not None:
        return build_tiny_model(cfg.model.tiny, seed=cfg.run.seed)
    return load_pretrained_model(cfg.model.path, trust_remote_code=cfg.model.trust_remote_code)


def build_rank_tokenizer(cfg: Config, examples, rank: int):
    """Rank 0 trains a sentencepiece model if one is needed and not cached; the others then load it."""
    tokenizer = build_tokenizer(cfg.data, cfg.model, examples) if rank == 0 else None
    dist.barrier()
    return tokenizer if rank == 0 else build_tokenizer(cfg.data, cfg.model, examples)


def check_vocab(model, tokenizer) -> None:
    vocab = model.get_input_embeddings().weight.shape[0]
    if tokenizer.vocab_size > vocab:
        raise ConfigError([f"data.tokenizer: the tokenizer has {tokenizer.vocab_size} ids but the model's "
                           f"embedding has {vocab} rows. Use the model's own tokenizer or a model with "
                           f"vocab_size >= {tokenizer.vocab_size}."])


def discover_domains(cfg: Config, rank: int, world_size: int):
    """data.discover: (Discovery, tokenizer, model) of data.train's records clustered by how the plain base
    model routes them (desmoe.discover; every rank routes a share). Writes nothing (save_discovery does, once
    every check has passed); also ``desmoe discover``'s (one process)."""
    unlabelled = discover.read_examples(cfg.data)
    discover.check_clusterable(len(unlabelled.examples), cfg.data.discover)
    tokenizer = build_rank_tokenizer(cfg, unlabelled.segments(), rank)
    fit_tiny_vocab(cfg, tokenizer)
    model = build_model(cfg)
    family = get_family(model.config.model_type)
    validate(cfg, num_experts=num_routed_experts(model.config, family))  # (world size: checked by resolve_config)
    check_vocab(model, tokenizer)
    found = discover.run_discovery(cfg, model, family, tokenizer, unlabelled, rank=rank, world_size=world_size)
    if rank == 0:
        print(discover.format_summary(found), flush=True)
    return found, tokenizer, model


def save_discovery(cfg: Config, found, tokenizer, output_dir: str, rank: int) -> None:
    """Rank 0 writes <run>/discovery/; every rank's config then names its labels (and its tokenizer.model when
    desmoe trained one), so config.yaml resumes, evaluates and exports without rediscovering."""
    out = os.path.join(output_dir, discover.DISCOVERY_DIR)
    kept_tokenizer = discover.trained_tokenizer_file(cfg, tokenizer)
    if rank == 0:
        files = discover.write_discovery(out, found, tokenizer_file=kept_tokenizer)
        print(f"discovered domains: {files['report_md']}", flush=True)
    dist.barrier()
    discover.adopt_labels(cfg, out, os.path.join(out, discover.TOKENIZER_FILE) if kept_tokenizer else None)


def setup(args) -> Run:
    cfg, output_dir = launch.resolve_config(args)
    dist.init_distributed(cfg.parallel.backend, cfg.parallel.timeout_s)
    world_size, rank = dist.get_world_size_and_rank()
    launch.check_same_config(cfg, rank, world_size)
    torch.manual_seed(cfg.run.seed)

    found = None
    if discover.needs_discovery(cfg):  # no domain labels: the base model's routing finds the domains
        found, tokenizer, model = discover_domains(cfg, rank, world_size)
        discover.check_trainable(found)
        discover.label_domains(cfg, found.names)
        loaded = found.domain_examples(cfg.data)
    else:
        loaded = load_domain_examples(cfg.data)  # every file read once, here
        tokenizer = build_rank_tokenizer(cfg, loaded[0], rank)
        fit_tiny_vocab(cfg, tokenizer)
        model = build_model(cfg)
        validate(cfg, world_size=world_size, num_experts=num_routed_experts(model.config))
        check_vocab(model, tokenizer)  # (discover_domains checked it already)
    family = get_family(model.config.model_type)
    domains, scan = build_domain_data(cfg.data, tokenizer, loaded)
    holdout = build_holdout(cfg.data, tokenizer)

    method = build_method(cfg, model, family, list(domains))
    ds_config = build_ds_config(cfg, family, model.config)
    if rank == 0:
        rundir.check_output_dir(output_dir, rundir.checkpoint_bytes(model))
    resume = None
    if args.resume is not None:
        root, tag = checkpoint.find_resumable(output_dir)
        # saved: the checkpoint's layout when it differs from this job's (None: the same, loaded as it is)
        saved = reshard.plan(os.path.join(root, tag), world_size=world_size, ep_size=cfg.parallel.ep_size)
        if saved is not None:
            ds_config = reshard.universal_ds_config(ds_config)
        resume = (root, tag, checkpoint.step_of(tag), saved)
    dist.barrier()  # every rank has passed every check before rank 0 writes anything
    if found is not None:
        save_discovery(cfg, found, tokenizer, output_dir, rank)
    if rank == 0:
        os.makedirs(output_dir, exist_ok=True)
        rundir.write_run_config(output_dir, dump_config(cfg), resumed_at=resume[2] if resume else None)
        rundir.write_json(output_dir, rundir.DS_CONFIG_FILE, ds_config)
    engine = build_engine(model, ds_config, cfg.train, param_groups=method.param_groups(model),
                          lr_factor=method.lr_factor)
    method.attach(engine)
    dist.apply_timeout(cfg.parallel.timeout_s)  # the expert-parallel groups DeepSpeed just made, too
    sampler = DomainSampler(domains, micro_batch_size=cfg.train.micro_batch_size, seed=cfg.run.seed, rank=rank,
                            world_size=world_size, sync_domains=cfg.data.sync_domains)
    run = Run(cfg=cfg, output_dir=output_dir, rank=rank, world_size=world_size, engine=engine, sampler=sampler,
              domains=domains, ds_config=ds_config, method=method, tokenizer=tokenizer, holdout=holdout,
              stop_at_step=args.stop_at_step)
    if resume is not None:
        load_checkpoint(run, *resume)
    start_logging(run, resumed=resume is not None)
    if rank == 0:
        table, rows = rundir.data_summary(domains, scan)
        print(table, flush=True)
        rundir.write_json(output_dir, rundir.DATA_SUMMARY_FILE, rows)
    if method.esft and resume is None:
        profile_esft(run)
    return run


def start_logging(run: Run, resumed: bool) -> None:
    """metrics.jsonl and MLflow on rank 0; the step log on every rank (it all-reduces)."""
    cfg = run.cfg
    metrics_file = None
    if run.master:
        metrics_file = rundir.open_metrics(run.output_dir, run.start_step)
        run.figures = rundir.FigureWriter()
        if cfg.tracking.mlflow:
            run.tracker = Tracker.start(cfg.to_dict(), run.ds_config, output_dir=run.output_dir, run_name=cfg.run.name,
                                        uri=cfg.tracking.uri, experiment=cfg.tracking.experiment, resume=resumed,
                                        tags={"desmoe.mode": cfg.method.mode})
    expert_load = ExpertLoad(autoep_layers(run.engine.module)) if cfg.tracking.mlflow else None
    run.log = StepLog(list(run.domains), mode=cfg.method.mode, master=run.master, metrics_file=metrics_file,
                      tracker=run.tracker, expert_load=expert_load, moe_layers=run.method.moe_layers)


def profile_esft(run: Run) -> None:
    """ESFT: route profile tokens of every domain, select and fix the experts that train."""
    selection = esft.profile(run.method, run.domains, micro_batch_size=run.cfg.train.micro_batch_size,
                             rank=run.rank, world_size=run.world_size)
    if run.master:
        rundir.write_json(run.output_dir, rundir.ESFT_SELECTION_FILE, selection)
        print("ESFT experts trained per MoE layer: " + "; ".join(
            f"layer {l}: {e}" for l, e in zip(run.method.moe_layers, selection["trained_union"])), flush=True)


# ---- checkpoints -----------------------------------------------------------------------------


def save_checkpoint(run: Run, step: int, elapsed_s: float, eval_before: dict, history: list,
                    best: dict | None) -> str:
    """The DeepSpeed checkpoint and this rank's desmoe state (what a resumed run needs besides it)."""
    state = {"step": step, "world_size": run.world_size, "elapsed_s": elapsed_s, "sampler": run.sampler.state_dict(),
             "rng": checkpoint.rng_state(), "eval_before": eval_before, "eval_history": history, "eval_best": best,
             "method": run.method.state_dict()}
    path = checkpoint.save(run.engine, run.output_dir, step, state, keep=run.cfg.checkpoint.keep, rank=run.rank)
    if run.master:
        print(f"checkpoint: {path}", flush=True)
    return path


def load_checkpoint(run: Run, root: str, tag: str, step: int, saved: reshard.Layout | None = None) -> None:
    """Weights, optimizer, LR schedule (DeepSpeed) and desmoe's state of ``tag``: the loop continues at step + 1.

    ``saved``: the checkpoint's layout when this job's world size or ep_size differs (desmoe.reshard: the
    universal checkpoint, desmoe's state mapped onto the new ranks); None loads it as it is (bit-exact)."""
    trust = run.cfg.checkpoint.trust_pickle
    if saved is None:
        state = checkpoint.load(run.engine, root, tag, rank=run.rank, trust_pickle=trust)
    else:
        state = reshard.load(run.engine, root, tag, saved, rank=run.rank, world_size=run.world_size,
                             seed=run.cfg.run.seed, trust_pickle=trust)
    run.sampler.load_state_dict(state["sampler"])
    run.method.load_state_dict(state["method"])
    checkpoint.set_rng_state(state["rng"])
    run.start_step, run.resumed = step, state
    if run.master:
        if saved is not None:
            print(reshard.describe(saved, step=step, world_size=run.world_size, ep_size=run.cfg.parallel.ep_size),
                  flush=True)
        print(f"resumed from {os.path.join(root, tag)} at step {step}", flush=True)


# ---- evaluation ------------------------------------------------------------------------------


def device_of(engine) -> torch.device:
    return next(engine.module.parameters()).device


def evaluate(run: Run) -> dict[str, dict[str, float]]:
    """Every domain's and data.holdout's eval metrics over all ranks (desmoe.evaluation.evaluate_sets)."""
    engine, dev = run.engine, device_of(run.engine)
    sets = dict(run.domains)
    if run.holdout is not None:
        sets["holdout"] = run.holdout

    def forward(ids, attention_mask=None, position_ids=None):
        return engine(input_ids=ids, attention_mask=attention_mask, position_ids=position_ids).logits

    engine.eval()
    try:
        with autocast(engine):  # generation calls engine.module.generate, outside engine.forward
            return evaluate_sets(forward, sets, tokenizer=run.tokenizer, rank=run.rank, world_size=run.world_size,
                                 batch_size=run.cfg.train.micro_batch_size, max_new_tokens=run.cfg.eval.max_new_tokens,
                                 max_pairs=run.cfg.eval.max_pairs, device=dev, model=engine.module)
    finally:
        engine.train()


def losses_of(results: dict[str, dict[str, float]]) -> dict[str, float]:
    return {k: v["loss"] for k, v in results.items()}


def _fmt_losses(losses: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.4f}" for k, v in losses.items())


def periodic_eval(run: Run, step: int, eval_before: dict, history: list, best: dict | None) -> dict | None:
    """eval.every: evaluate, record in eval.json and MLflow, keep the best weights (eval.keep_best);
    returns the best evaluation so far. Every rank calls it."""
    cfg, names = run.cfg, list(run.domains)
    results = evaluate(run)
    value = select_value(results, names, cfg.eval.best_metric)
    history.append({"step": step, "mean_loss": select_value(results, names, "loss"), cfg.eval.best_metric: value,
                    "results": results})
    if run.master:
        run.tracker.log_metrics(flat_metrics(results, "eval"), step)
        run.log.write(f"eval at step {step}: {_fmt_losses(losses_of(results))}")
        rundir.write_eval(run.output_dir, eval_before, None, history)
    if cfg.eval.keep_best and value is not None and is_better(cfg.eval.best_metric, value, best and best["value"]):
        best = {"step": step, "metric": cfg.eval.best_metric, "value": value}
        checkpoint.save_best(run.engine, run.output_dir, best, rank=run.rank)
    return best


# ---- the loop --------------------------------------------------------------------------------


def train(run: Run) -> dict:
    cfg, engine, method = run.cfg, run.engine, run.method
    names = list(run.domains)
    dev = device_of(engine)
    if run.resumed is None:
        eval_before = evaluate(run)
        elapsed_before, history, best = 0.0, [], None
    else:  # the base model's results, measured when the run started
        eval_before, elapsed_before = run.resumed["eval_before"], run.resumed["elapsed_s"]
        history, best = run.resumed["eval_history"], run.resumed["eval_best"]
    if run.master:
        print(f"loss before training: {_fmt_losses(losses_of(eval_before))}", flush=True)
        run.tracker.log_metrics(flat_metrics(eval_before, "eval_before"), run.start_step)
    run.log.start_progress(cfg.train.max_steps, start_step=run.start_step, every=cfg.train.log_every)
    t_start = time.perf_counter() - elapsed_before
    last_step = cfg.train.max_steps if run.stop_at_step is None else min(run.stop_at_step, cfg.train.max_steps)
    bad_steps = BadSteps(cfg.train.max_bad_steps)
    for step in range(run.start_step + 1, last_step + 1):
        t0 = time.perf_counter()
        method.begin_step(step)  # phase, lambda
        # per domain, this rank: [task loss, KD loss] sums on the device (read once per step),
        # [micro-batches, tokens] on the host
        losses = torch.zeros(len(names), 2, device=dev)
        counts = torch.zeros(len(names), 2, dtype=torch.float64)
        skipped_before = engine.skipped_steps
        lr = max(engine.get_lr())  # this step's LR (of the groups that train now: a phase sets frozen groups' to 0)
        for _ in range(cfg.train.grad_accum_steps):
            domain, ids, labels = run.sampler.next_batch()
            # gradient masks of this domain's experts; the affinity counts real tokens, not padding
            method.begin_micro_batch(domain, real_token_mask(ids, labels, run.tokenizer.pad_id))
            out = engine(input_ids=ids.to(dev), labels=labels.to(dev))
            if faults.active("nan_loss", step):
                out.loss = out.loss * float("nan")
            aux = method.aux_loss()  # lambda * L_KD (router only), or None
            engine.backward(out.loss if aux is None else out.loss + aux)
            boundary = engine.is_gradient_accumulation_boundary()
            if boundary:
                method.before_optimizer_step()  # save rows that must not move
            engine.step()
            if boundary:
                method.after_optimizer_step()
            j = names.index(domain)
            losses[j, 0] += out.loss.detach().float()
            kd = method.last_kd()
            if kd is not None:
                losses[j, 1] += kd.float()
            counts[j, 0] += 1
            counts[j, 1] += (labels != IGNORE_INDEX).sum().item()
        bad = engine.skipped_steps > skipped_before
        if bad:
            # DeepSpeed found a non-finite gradient on some rank and skipped the update on every rank;
            # the LR schedule still follows the step count (phases are tied to it).
            engine.lr_scheduler.step()
        updates = method.end_step(step)  # affinity EMA and masks every T_update steps
        if updates and run.master:
            record_affinity(run, updates, step)
        now = time.perf_counter()
        extra = {**method.metrics(), "skipped_step": True} if bad else method.metrics()
        run.log.add(StepRecord(step, now - t0, now - t_start, lr, extra,
                               torch.cat([losses.double().cpu(), counts], dim=1)))
        save_now = (cfg.checkpoint.every and step % cfg.checkpoint.every == 0) or step == run.stop_at_step or (
            step == cfg.train.max_steps and cfg.checkpoint.save_final)
        if step % cfg.train.log_every == 0 or step == last_step or save_now or bad:
            run.log.flush()
        stop = bad_steps.observe(bad)
        if bad:
            report_bad_step(run, step, bad_steps, stop)
        if cfg.eval.every and step % cfg.eval.every == 0 and step != cfg.train.max_steps:
            best = periodic_eval(run, step, eval_before, history, best)
        if save_now:  # metrics.jsonl is complete up to this step
            save_checkpoint(run, step, time.perf_counter() - t_start, eval_before, history, best)

    if last_step < cfg.train.max_steps:
        if run.master:  # the pending heatmaps are waited for by cleanup (Run.close)
            print(f"stopped at step {last_step} (--stop-at-step); continue with: desmoe train --resume "
                  f"{run.output_dir}", flush=True)
        return {"output_dir": run.output_dir, "steps": last_step, "stopped_at_step": last_step}
    return finish(run, eval_before, history, best, t_start)


def record_affinity(run: Run, updates: list[dict], step: int) -> None:
    """Rank 0: each affinity update's files (affinity/step<N>.json, .png) and the domains' overlap in MLflow."""
    for record in updates:
        rundir.write_affinity(run.output_dir, record, run.figures)
    run.tracker.log_metrics(domain_overlap(run.method.masks, run.method.domains), step)


def report_bad_step(run: Run, step: int, bad: BadSteps, stop: bool) -> None:
    """Report a skipped non-finite step; TrainingStopped after train.max_bad_steps in a row."""
    run.log.write(f"warning: step {step}: non-finite loss or gradient; the update was skipped "
                  f"({bad.in_row} in a row, {bad.total} in all)")
    if stop:
        last = checkpoint.latest_tag(os.path.join(run.output_dir, checkpoint.CHECKPOINTS))
        raise launch.TrainingStopped(
            f"{bad.in_row} steps in a row (to step {step}) had a non-finite loss or gradient (train.max_bad_steps="
            f"{bad.limit}); stopped. Last complete checkpoint: {last or 'none'} in {run.output_dir}/checkpoints. "
            "Lower train.lr, check the data of these steps, or raise train.max_bad_steps.")


def finish(run: Run, eval_before: dict, history: list, best: dict | None, t_start: float) -> dict:
    """Evaluate the trained model; write eval.json/.md and summary.json, log them to MLflow (rank 0).

    NOTE: train_time_s runs from the first step to here, so it includes this final evaluation."""
    cfg = run.cfg
    eval_after = evaluate(run)
    loss_before, loss_after = losses_of(eval_before), losses_of(eval_after)
    if run.master:
        rundir.write_eval(run.output_dir, eval_before, eval_after, history)
    summary = {"output_dir": run.output_dir, "steps": cfg.train.max_steps, "mode": cfg.method.mode,
               "world_size": run.world_size, "ep_size": cfg.parallel.ep_size,
               "train_time_s": time.perf_counter() - t_start, "eval_loss_before": loss_before,
               "eval_loss_after": loss_after, "eval_before": eval_before, "eval_after": eval_after, "best": best}
    if run.master:
        rundir.write_json(run.output_dir, rundir.SUMMARY_FILE, summary)
        print(f"run directory: {run.output_dir}")
        print(f"{'domain':<12} {'loss before':>12} {'loss after':>11}")
        for n in loss_before:
            print(f"{n:<12} {loss_before[n]:>12.4f} {loss_after[n]:>11.4f}")
        run.tracker.log_metrics(flat_metrics(eval_after, "eval_after"), cfg.train.max_steps)
        finish_figures(run)
        for path, artifact_path in rundir.run_artifacts(run.output_dir):
            run.tracker.log_artifact(path, artifact_path=artifact_path)
    return summary


def finish_figures(run: Run) -> None:
    """Rank 0: wait for the affinity heatmaps, and draw how each domain's expert set evolved
    (affinity/evolution.png), so both go to MLflow with the affinity/ folder."""
    failed = run.figures.close()
    if failed:
        print(f"warning: {len(failed)} affinity heatmap(s) could not be drawn (the JSON records are complete)",
              flush=True)
    if not os.path.isdir(os.path.join(run.output_dir, rundir.AFFINITY_DIR)):
        return  # no affinity update (fft, ESFT)
    try:
        print(f"affinity evolution: {affinity_report.plot_evolution(run.output_dir)}", flush=True)
    except (OSError, ValueError) as e:  # e.g. a resumed run whose records disagree: the run is still done
        print(f"warning: no affinity evolution figure: {e}", flush=True)


def cleanup(run: Run | None) -> None:
    if run is not None:
        run.close("FINISHED")
    dist.barrier()
    dist.destroy()


def main(argv: list[str] | None = None) -> int:
    return launch.run_rank(argv, setup, train, cleanup)


if __name__ == "__main__":
    launch.exit_without_finalization(main())
