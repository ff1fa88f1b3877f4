"""``desmoe`` command line: ``desmoe train|discover|eval|config|affinity|export|compare ...``.

NOTE: each command imports its own stack (torch, DeepSpeed, the recipe) when it runs, so
``desmoe --help`` and ``desmoe config`` answer at once; the rest of desmoe imports at module top.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile

USAGE = """desmoe <command> [options]

commands:
  train    fine-tune: desmoe train --config configs/demo.yaml [--nproc N] [section.key=value ...]
  discover find domains in unlabelled data.train records by how the base model routes them (k-means):
           desmoe discover --config CONFIG --out DIR [--overwrite] [section.key=value ...]
           (writes DIR/records.jsonl with a "domain" field, report.json/.md, clusters.png)
  config   print every config section and key with its default and meaning
  affinity print each domain's experts per MoE layer and the overlap between domains: desmoe affinity RUN_DIR
           [--plot [--out PATH]]  (how each domain's expert set evolved over training)
  export   write a Hugging Face model directory from a run's checkpoint: desmoe export RUN_DIR --out DIR [--checkpoint TAG]
           [--domain NAME --prune [--coverage C]]  (only that domain's experts; C: those holding C of its affinity)
  eval     evaluate a run's checkpoint (loss, perplexity, accuracy, exact match, chrF): desmoe eval RUN_DIR [--checkpoint TAG]
           [--data CONFIG]  (on another config's domains, eval rows and holdout, with the run's tokenizer)
           [--restrict-to-domains [--coverage C]]  (each domain also routed only among its own experts)
  compare  compare runs (domain losses, task metrics, forgetting, time; table and figures):
           desmoe compare RUN_DIR [RUN_DIR ...] [--out DIR]
"""


def _train(argv: list[str]) -> int:
    # --nproc N: start N local ranks with torchrun; without it, run in this process (a launcher
    # such as deepspeed or torchrun may already have started us as one of several ranks).
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--nproc", type=int, default=None)
    known, rest = pre.parse_known_args(argv)
    if known.nproc is None or "RANK" in os.environ:
        from desmoe.train import main

        return main(rest)
    if known.nproc < 1:
        print(f"desmoe: error: --nproc {known.nproc} must be >= 1.", file=sys.stderr)
        return 2
    from desmoe import launch

    args = launch.parse_args(rest)
    try:  # report config, model and data problems once, before starting any rank
        cfg, _ = launch.resolve_config(args, world_size=known.nproc)
        launch.preflight(cfg)
    except launch.USER_ERRORS as e:
        return launch.report_user_error(e)
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={known.nproc}",
           "-m", "desmoe.train", *rest]
    print("desmoe: running " + " ".join(cmd), flush=True)
    with tempfile.TemporaryDirectory(prefix="desmoe-exit-") as codes:
        # NOTE: a rank that ends with a reported error (exit 2: bad input, 3: stopped) writes its
        # code here and exits 0, so torchrun does not add a traceback of its own to the message.
        env["DESMOE_EXIT_CODE_DIR"] = codes
        rc = subprocess.call(cmd, env=env)
        if rc != 0:
            return rc
        reported = [int(open(os.path.join(codes, f)).read()) for f in os.listdir(codes)]
    return max(reported, default=0)


def _eval(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="desmoe eval", description="Evaluate a run's checkpoint on its domains' eval "
                                "rows and data.holdout, in this process; writes eval_<TAG>.json and eval_<TAG>.md.")
    p.add_argument("run_dir", metavar="RUN_DIR", help="the run directory (desmoe train --output-dir)")
    p.add_argument("--checkpoint", default=None, metavar="TAG",
                   help="checkpoint tag under RUN_DIR/checkpoints, e.g. step200 or best (default: latest)")
    p.add_argument("--out", default=None, metavar="DIR", help="where to write the results (default: RUN_DIR)")
    p.add_argument("--data", default=None, metavar="CONFIG",
                   help="evaluate on this run config's data section instead (its domains, eval rows and holdout; "
                        "the run's tokenizer); writes eval_<TAG>_<CONFIG name>.json/.md")
    p.add_argument("--restrict-to-domains", action="store_true",
                   help="also evaluate each domain with every MoE layer routing only among that domain's experts "
                        "(the run's selection); writes eval_<TAG>_restricted.json/.md beside the unrestricted files")
    p.add_argument("--coverage", type=float, default=None, metavar="C",
                   help="with --restrict-to-domains: restrict each domain instead to its serving selection, per MoE "
                        "layer its most affine experts until they hold C (0 < C <= 1) of its affinity, topped up to "
                        "top_k; writes eval_<TAG>_restricted_cov<C>.json/.md")
    args = p.parse_args(argv)
    _offline_process()
    from desmoe.eval_checkpoint import eval_run

    try:
        result = eval_run(args.run_dir, args.checkpoint, out=args.out, data_config=args.data,
                          restrict_to_domains=args.restrict_to_domains, coverage=args.coverage)
    except _offline_errors() as e:
        print(f"desmoe: error: {e}", file=sys.stderr)
        return 2
    on = f" on the data of {os.path.abspath(args.data)}" if args.data else ""
    print(f"checkpoint {result['checkpoint']} of {os.path.abspath(args.run_dir)}{on}\n{result['table']}")
    print(f"written: {result['file']}")
    if "restricted" in result:
        print(f"\neach domain unrestricted and restricted to its own experts ({result['restricted']['rule']}):\n"
              f"{result['restricted']['table']}")
        print(f"written: {result['restricted']['file']}")
    return 0


def _discover(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="desmoe discover", description="Find domains in the unlabelled records of "
                                "data.train: each example's routing signature under the base model (per MoE layer, "
                                "the share of its tokens routed to each expert), clustered with k-means "
                                "(data.discover: clusters K, or K by silhouette). In this process.")
    p.add_argument("--config", required=True, help="run YAML with data.train and data.discover")
    p.add_argument("--out", required=True, metavar="DIR",
                   help="where to write records.jsonl (the records with a \"domain\" field), report.json, "
                        "report.md and clusters.png")
    p.add_argument("--overwrite", action="store_true", help="replace the labels of an earlier discovery in DIR")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. data.discover.clusters=4")
    args = p.parse_intermixed_args(argv)
    _offline_process()
    from desmoe import discover
    from desmoe.config import ConfigError, load_config
    from desmoe.train import discover_domains

    out = os.path.abspath(args.out)
    try:
        cfg = load_config(args.config, args.overrides)
        if cfg.data.discover is None:
            raise ConfigError([f"data.discover: not set in {args.config}. Add data.discover: {{clusters: K}} (or "
                               "{} to choose K by silhouette) and data.train: the unlabelled records."])
        if cfg.data.discover.labels is not None:
            raise ConfigError([f"data.discover.labels: {cfg.data.discover.labels} is set, so there is nothing to "
                               "discover. Unset it (data.discover.labels=null) to cluster data.train."])
        discover.check_out_dir(out, overwrite=args.overwrite)
        found, tokenizer, _ = discover_domains(cfg, rank=0, world_size=1)
        files = discover.write_discovery(out, found, tokenizer_file=discover.trained_tokenizer_file(cfg, tokenizer))
    except _offline_errors() as e:
        print(f"desmoe: error: {e}", file=sys.stderr)
        return 2
    try:
        discover.check_trainable(found)
    except discover.DiscoveryError as e:
        print(f"desmoe: warning: {e}", file=sys.stderr)
    for what, path in files.items():
        print(f"written: {path}  ({what})")
    use = f"data.train={files['records']} data.discover.labels={files['records']}"
    if "tokenizer" in files:
        use += f" data.tokenizer={files['tokenizer']}"
    print(f"train on these domains: desmoe train --config {args.config} {use}")
    return 0


def _offline_errors() -> tuple[type[Exception], ...]:
    """What ``desmoe eval`` / ``desmoe export`` report as a user error (exit 2): a bad run directory,
    checkpoint, export directory, config, model, data, or domain restriction / pruning."""
    from desmoe.checkpoint import CheckpointError
    from desmoe.config import ConfigError
    from desmoe.data import DataError
    from desmoe.export import ExportError
    from desmoe.models import ModelError
    from desmoe.restrict import DomainError
    from desmoe.rundir import RunDirError

    return (RunDirError, CheckpointError, ExportError, ConfigError, ModelError, DataError, DomainError)


def _offline_process() -> None:
    """Set-up of a one-process command (eval, export): DeepSpeed's environment (before DeepSpeed is
    imported), quiet libraries."""
    from desmoe import dist

    dist.setup_env()
    import transformers

    from desmoe.launch import quiet_libraries

    quiet_libraries()
    transformers.utils.logging.disable_progress_bar()


def _affinity(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="desmoe affinity", description="Print each domain's experts per MoE layer and "
                                "the overlap between domains (the run's latest affinity update, or its ESFT "
                                "selection); --plot draws how the expert sets evolved over training.")
    p.add_argument("run_dir", metavar="RUN_DIR", help="the run directory (desmoe train --output-dir)")
    p.add_argument("--plot", action="store_true", help="write the evolution figure (default RUN_DIR/affinity/"
                   "evolution.png): per layer, each domain's selection at each update, its overlap with the final "
                   "set and with the other domains")
    p.add_argument("--out", default=None, metavar="PATH", help="where --plot writes the figure")
    args = p.parse_args(argv)
    from desmoe.affinity_report import format_report, load_latest_selection, plot_evolution

    try:
        print(format_report(load_latest_selection(args.run_dir)))
        if args.plot:
            print(f"written: {plot_evolution(args.run_dir, args.out)}")
    except (FileNotFoundError, ValueError, KeyError) as e:
        print(f"desmoe: error: {e}", file=sys.stderr)
        return 2
    return 0


def _export(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="desmoe export", description="Write a Hugging Face model directory (safetensors, "
                                "config.json, tokenizer, adaptive routers) from a desmoe run's checkpoint.")
    p.add_argument("run_dir", metavar="RUN_DIR", help="the run directory (desmoe train --output-dir)")
    p.add_argument("--out", required=True, metavar="DIR", help="the directory to write")
    p.add_argument("--checkpoint", default=None, metavar="TAG",
                   help="checkpoint tag under RUN_DIR/checkpoints (default: the one checkpoints/latest names)")
    p.add_argument("--overwrite", action="store_true", help="replace DIR if it exists and is not empty")
    p.add_argument("--domain", default=None, metavar="NAME",
                   help="with --prune: the domain whose experts the pruned model keeps")
    p.add_argument("--prune", action="store_true",
                   help="write a model with only --domain's experts (its selected ones, topped up with its next "
                        "most affine to one count in every layer); AutoModelForCausalLM loads it without desmoe")
    p.add_argument("--coverage", type=float, default=None, metavar="C",
                   help="with --prune: keep instead --domain's serving selection, per MoE layer its most affine "
                        "experts until they hold C (0 < C <= 1) of its affinity (then topped up as above)")
    args = p.parse_args(argv)
    _offline_process()
    from desmoe.export import export_run

    try:
        meta = export_run(args.run_dir, args.out, tag=args.checkpoint, overwrite=args.overwrite, domain=args.domain,
                          prune=args.prune, coverage=args.coverage)
    except _offline_errors() as e:
        print(f"desmoe: error: {e}", file=sys.stderr)
        return 2
    alr = meta["adaptive_routers"]
    print(f"exported {os.path.join(meta['run_dir'], 'checkpoints', meta['checkpoint'])} -> {os.path.abspath(args.out)}")
    print(f"  {meta['model_type']}, {meta['dtype']}, experts of {len(meta['moe_layers'])} MoE layers gathered; "
          f"tokenizer: {meta['tokenizer']['kind']}")
    pruned = meta["pruned"]
    if pruned:
        saved = 1 - pruned["parameters"] / pruned["original_parameters"]
        rule = "training selection" if pruned["coverage"] is None else f"coverage {pruned['coverage']:g}"
        print(f"  pruned for domain {pruned['domain']} ({rule}): {pruned['num_experts']} of "
              f"{pruned['original_num_experts']} experts per MoE layer; {pruned['parameters']:,} of "
              f"{pruned['original_parameters']:,} parameters ({saved:.1%} saved), "
              f"{pruned['weight_bytes'] / 2**20:.2f} of {pruned['original_weight_bytes'] / 2**20:.2f} MiB of weights")
    elif meta["domain_experts"]:
        print(f"  each domain's experts in {meta['domain_experts']}: desmoe.load_pretrained(DIR, domain=NAME) routes "
              "only among them")
    if alr:
        print(f"  adaptive routers of layers {alr['layers']} in {alr['file']}: load with desmoe.load_pretrained(DIR); "
              "AutoModelForCausalLM.from_pretrained(DIR) routes without them")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0 if argv else 2
    cmd, rest = argv[0], argv[1:]
    if cmd == "train":
        return _train(rest)
    if cmd == "export":
        return _export(rest)
    if cmd == "discover":
        return _discover(rest)
    if cmd == "eval":
        return _eval(rest)
    if cmd == "compare":
        from desmoe.compare import main as compare

        return compare(rest)
    if cmd == "affinity":
        return _affinity(rest)
    if cmd == "config":
        from desmoe.config import describe

        print(describe())
        return 0
    print(f"desmoe: error: unknown command {cmd!r}.\n\n{USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
