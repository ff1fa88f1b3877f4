"""Process plumbing of ``desmoe train``: arguments, the run's config and directory, checks before any
rank starts, and exit codes. The recipe itself is desmoe/train.py.

Exit codes: 0 finished (or stopped at --stop-at-step), 2 a user error (config, model, data,
checkpoint), 3 stopped by train.max_bad_steps; anything else is a crash with its traceback.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import sys
import warnings

from desmoe import checkpoint, discover, dist
from desmoe.config import Config, ConfigError, dump_config, load_config, validate
from desmoe.data import DataError, load_domain_examples, train_sentencepiece
from desmoe.models import ModelError, load_pretrained_config
from desmoe.rundir import taken_files

USER_ERRORS = (ConfigError, ModelError, DataError, checkpoint.CheckpointError)


class TrainingStopped(RuntimeError):
    """The run cannot go on (e.g. train.max_bad_steps non-finite steps in a row); exit code 3."""


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


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """``desmoe train`` arguments; options and section.key=value overrides in any order."""
    return build_arg_parser().parse_intermixed_args(argv)


def resolve_config(args, world_size: int | None = None) -> tuple[Config, str]:
    """Config and run directory from CLI arguments; ConfigError on any problem, CheckpointError when
    ``--resume`` finds no checkpoint it can use (nothing written yet).

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
    cfg = discover.resolve_labels(load_config(args.config, args.overrides))
    if args.output_dir is not None:
        cfg.run.output_dir = os.path.abspath(args.output_dir)
    output_dir = cfg.run.output_dir or os.path.abspath(os.path.join("runs", cfg.run.name))
    cfg.run.output_dir = output_dir
    validate(cfg, world_size=world_size)
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise ConfigError([f"run.output_dir: {output_dir!r} exists and is not a directory. Choose another "
                           "--output-dir."])
    taken = taken_files(output_dir)
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
    cfg = discover.resolve_labels(load_config(saved, args.overrides))
    cfg.run.output_dir = run_dir
    validate(cfg, world_size=world_size)
    root, tag = checkpoint.find_resumable(run_dir)
    step = checkpoint.step_of(tag)
    if step >= cfg.train.max_steps:
        raise ConfigError([f"--resume {args.resume}: its checkpoint {tag} is at step {step}, train.max_steps is "
                           f"{cfg.train.max_steps}: nothing left to train."])
    if args.stop_at_step is not None and not step < args.stop_at_step:
        raise ConfigError([f"--stop-at-step: {args.stop_at_step} must be after the checkpoint's step {step}."])
    return cfg, run_dir


def preflight(cfg: Config) -> None:
    """Checks that need no ranks: the model source and every data file (data.discover: the records of data.train
    read, enough of them for the clusters; the model runs later, in the ranks). Raises the user errors."""
    if cfg.model.path is not None:
        load_pretrained_config(cfg.model.path, trust_remote_code=cfg.model.trust_remote_code)
    if discover.needs_discovery(cfg):
        unlabelled = discover.read_examples(cfg.data)
        discover.check_clusterable(len(unlabelled.examples), cfg.data.discover)
        examples = unlabelled.segments()
    else:
        examples, _ = load_domain_examples(cfg.data)
    if cfg.data.tokenizer == "sentencepiece":
        train_sentencepiece(cfg.data, examples)  # once, before the ranks start


def check_same_config(cfg: Config, rank: int, world_size: int) -> None:
    """Every rank must run the same resolved config (launchers on several nodes read their own files)."""
    digest = hashlib.sha256(dump_config(cfg).encode()).hexdigest()
    gathered = dist.all_gather_objects(digest) if world_size > 1 else [digest]
    differ = [r for r, d in enumerate(gathered) if d != gathered[0]]
    if differ:
        raise ConfigError([f"rank(s) {differ} resolved a different configuration than rank 0 (config file, overrides "
                           "or paths differ between nodes). Give every node the same files and arguments."])


def quiet_libraries() -> None:
    """DeepSpeed and transformers log every rank's set-up at INFO; keep warnings and errors."""
    warnings.filterwarnings("ignore", message=r".*(all_gather_into_tensor|reduce_scatter_tensor).* is deprecated",
                            category=FutureWarning)
    # "DeepSpeed" is deepspeed.utils.logger's name
    for name in ("DeepSpeed", "deepspeed", "transformers", "torch.distributed"):
        logging.getLogger(name).setLevel(logging.WARNING)


def report_user_error(err: Exception) -> int:
    """Print a user error once (rank 0 of the launch) and return exit code 2."""
    if os.environ.get("RANK", "0") == "0":
        print(f"desmoe: error: {err}", file=sys.stderr, flush=True)
    return 2


def run_rank(argv: list[str] | None, setup, train, cleanup) -> int:
    """One rank of ``desmoe train``: ``run = setup(args); train(run); cleanup(run)``, with every way of
    ending turned into an exit code.

    The run has ``close(status)`` (metrics file, progress, MLflow run), called on a failure.
    Started by ``desmoe train --nproc N`` (DESMOE_EXIT_CODE_DIR set), a rank that ends with a reported
    error writes its code there and exits 0, so torchrun adds no traceback of its own to the message.
    """
    code = _run_guarded(argv, setup, train, cleanup)
    codes = os.environ.get("DESMOE_EXIT_CODE_DIR")
    if codes and code != 0:
        with open(os.path.join(codes, f"rank{os.environ.get('RANK', '0')}"), "w") as f:
            f.write(str(code))
        return 0
    return code


def _run_guarded(argv: list[str] | None, setup, train, cleanup) -> int:
    args = parse_args(argv)
    dist.setup_env()
    quiet_libraries()
    run = None
    try:
        run = setup(args)
        train(run)
    except USER_ERRORS as e:
        # Every rank sees the same config and data, so every rank stops here together.
        _close(run, "FAILED")
        dist.destroy()
        return report_user_error(e)
    except TrainingStopped as e:
        # every rank decides alike (the skipped steps are the same on every rank)
        _close(run, "FAILED")
        dist.destroy()
        if os.environ.get("RANK", "0") == "0":
            print(f"desmoe: stopped: {e}", file=sys.stderr, flush=True)
        return 3
    except KeyboardInterrupt:
        _close(run, "KILLED")
        raise
    except BaseException:
        _close(run, "FAILED")  # metrics.jsonl is flushed at every log interval; MLflow learns the run failed
        raise
    cleanup(run)
    return 0


def _close(run, status: str) -> None:
    if run is not None:
        run.close(status)


def exit_without_finalization(code: int) -> None:
    """Leave the process with ``code``, skipping interpreter finalization.

    NOTE: gloo's worker threads can still hold tensors after destroy_process_group, and tearing them
    down during finalization aborts (SIGABRT) now and then (pytorch/pytorch#190489), turning a
    finished run into a failed job."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
