"""Run configuration: dataclass sections, strict YAML loading, ``key=value`` overrides, one validate().

Every field carries its help text in ``metadata["help"]``. Loading never raises a bare
traceback at a user: every problem found (unknown key, wrong type, inconsistent values)
is collected and raised once as :class:`ConfigError`, each line naming the key, the
value and the fix.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import os
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

import yaml

from desmoe.constants import METHOD_MODES
from desmoe.data.builtin import BUILTIN_DOMAINS, TASK_METRICS
from desmoe.models import ModelError, tiny_config_kwargs
from desmoe.schedule import check_phase_trainable


class ConfigError(ValueError):
    """One or more problems with a run configuration; ``problems`` lists them all."""

    def __init__(self, problems: list[str], source: str | None = None):
        self.problems = list(problems)
        self.source = source
        where = f" in {source}" if source else ""
        lines = [f"{len(self.problems)} problem(s) with the configuration{where}:"]
        lines += [f"  - {p}" for p in self.problems]
        super().__init__("\n".join(lines))


def _f(default: Any = dataclasses.MISSING, help: str = "", *, factory: Any = None):
    if factory is not None:
        return field(default_factory=factory, metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class RunSection:
    name: str = _f("desmoe", "Run name; the default output directory is runs/<name>.")
    output_dir: Optional[str] = _f(None, "Run directory (config.yaml, metrics.jsonl, checkpoints). "
                                   "Default: runs/<name> under the current directory.")
    overwrite: bool = _f(False, "Allow writing into a run directory that already holds a run (its files are replaced).")
    seed: int = _f(1234, "Seed for model initialisation, data order and sampling; the same seed repeats a run.")


@dataclass
class ModelSection:
    path: Optional[str] = _f(None, "Local Hugging Face model directory (config.json + weights).")
    tiny: Optional[dict] = _f(None, "Random-initialised model instead of model.path: {model_type: ..., "
                              "<HF config keys>}; for demos and tests.")
    trust_remote_code: bool = _f(False, "Let transformers run code shipped with the model directory. "
                                 "Only for models you trust.")


@dataclass
class ParallelSection:
    ep_size: int = _f(1, "Expert-parallel size (DeepSpeed AutoEP autoep_size): each rank holds "
                      "num_experts / ep_size experts. Must divide the world size and the expert count.")
    zero_stage: Literal[1, 2, 3] = _f(1, "ZeRO stage (1, 2 or 3; 3 partitions the weights too, through "
                                     "DeepSpeed AutoEP's ZeRO-3 path).")
    ds_config: Optional[str] = _f(None, "DeepSpeed JSON (precision, communication); default "
                                  "ds_configs/cpu_fp32.json without CUDA, ds_configs/gpu_bf16.json with it.")
    backend: Literal["auto", "gloo", "nccl"] = _f("auto", "torch.distributed backend; auto = nccl on CUDA, gloo on CPU.")
    timeout_s: int = _f(1800, "Seconds a collective may wait for the other ranks before the job fails (a dead or "
                        "stuck rank ends the job instead of hanging it).")


@dataclass
class TrainSection:
    max_steps: int = _f(100, "Number of optimizer steps.")
    micro_batch_size: int = _f(4, "Sequences per rank per micro-step.")
    grad_accum_steps: int = _f(1, "Micro-steps per optimizer step.")
    global_batch_size: Optional[int] = _f(None, "Optional check: must equal micro_batch_size x grad_accum_steps "
                                          "x data-parallel world size.")
    lr: float = _f(1e-4, "Peak learning rate (AdamW).")
    weight_decay: float = _f(0.0, "AdamW decoupled weight decay.")
    betas: list = _f(factory=lambda: [0.9, 0.95], help="AdamW betas [beta1, beta2].")
    warmup_steps: int = _f(0, "Linear warm-up steps from 0 to lr.")
    lr_schedule: Literal["constant", "cosine", "linear"] = _f("constant", "LR after warm-up.")
    min_lr_ratio: float = _f(0.1, "Final LR as a fraction of lr (cosine and linear schedules).")
    grad_clip: float = _f(1.0, "Gradient-norm clipping; 0 disables.")
    log_every: int = _f(1, "Print a progress line every N steps (metrics.jsonl gets every step).")
    max_bad_steps: int = _f(5, "A step whose loss or gradients are not finite is skipped and counted; after this "
                            "many in a row the run stops (its last checkpoint stays as it was).")


@dataclass
class DomainSection:
    train: Optional[str] = _f(None, "jsonl/parquet file, glob, or save_to_disk folder of this domain's records "
                              "(a \"domain\" field, if present, must match).")
    builtin: Optional[str] = _f(None, "Use a built-in sample corpus instead of a file (see desmoe.data.builtin).")
    format: Literal["text", "prompt_response", "chat"] = _f(
        "text", "Record format: text {text}; prompt_response {prompt, response} (loss on the response); chat "
        "{messages: [{role, content}]} (loss on assistant turns). Files: .jsonl, .parquet, or a save_to_disk folder.")
    weight: float = _f(1.0, "Mixing weight: how often this domain is drawn relative to the others.")
    max_examples: Optional[int] = _f(None, "Use at most this many examples (in file order).")
    eval: Optional[str] = _f(None, "Optional eval data (file, glob or save_to_disk folder, same formats as train): "
                             "the eval rows come from it, in file order, and no training example is held out.")
    metric: Optional[Literal["exact_match", "chrf", "token_accuracy"]] = _f(
        None, "Task metric: exact_match or chrf (greedy answer vs. reference; needs prompt_response or chat "
        "records) or token_accuracy (next-token accuracy on the eval rows). Default: a built-in corpus's own, "
        "exact_match for prompt_response, token_accuracy for text and chat.")


@dataclass
class DiscoverSection:
    clusters: Optional[int] = _f(None, "K, the number of domains to find. Unset: the K in [min_clusters, max_clusters] "
                                 "with the best silhouette score.")
    min_clusters: int = _f(2, "Smallest K tried when clusters is unset.")
    max_clusters: int = _f(12, "Largest K tried when clusters is unset (capped at the number of examples - 1).")
    features: Literal["share", "share_gate"] = _f(
        "share", "Routing signature of an example, per MoE layer, concatenated: 'share' (the fraction of its tokens "
        "routed to each expert) or 'share_gate' (that, plus the mean gate probability of each expert).")
    format: Literal["text", "prompt_response", "chat"] = _f("text", "Record format of the data.train records.")
    max_examples: Optional[int] = _f(None, "Read at most this many records of data.train (in file order).")
    max_tokens: int = _f(256, "Tokens of each example routed for its signature (its first ones).")
    name_prefix: str = _f("cluster", "Discovered domains are named <name_prefix>_0, <name_prefix>_1, ...")
    seed: Optional[int] = _f(None, "Seed of k-means; default run.seed.")
    labels: Optional[str] = _f(None, "Labelled records to train on instead of discovering: a records.jsonl that "
                               "desmoe discover (or a run's discovery/) wrote. Set by desmoe in a run's saved "
                               "config.yaml, so resume, eval and export use the same labels.")


@dataclass
class DataSection:
    domains: dict = _f(factory=dict, help="Domains to train on: <name>: {train: PATH | builtin: NAME, weight, ...}.")
    train: Optional[str] = _f(None, "Optional mixed jsonl file or glob of {\"domain\": ..., \"text\": ...} records; "
                              "every domain it names must be listed in data.domains (an empty {} entry is enough).")
    holdout: Optional[dict] = _f(None, "General text no domain trains on, evaluated before and after training to "
                                 "measure forgetting: {train: PATH | builtin: general, format: ...}.")
    holdout_sequences: int = _f(32, "Sequences of data.holdout evaluated.")
    discover: Optional[dict] = _f(None, "Find the domains without labels: the records of data.train (no \"domain\" "
                                  "field needed) are clustered by how the base model routes them (desmoe.discover). "
                                  "{clusters: K, features, format, ...}; needs no data.domains.")
    seq_len: int = _f(128, "Tokens per training sequence; examples are packed into sequences of this length.")
    eval_sequences: int = _f(8, "Sequences per domain evaluated (before/after loss, task metrics): whole "
                             "examples, never trained on, from data.domains.<name>.eval if set, else held out of "
                             "the domain's data (a fixed draw per domain name, the same for every run seed; at most "
                             "a fifth of the domain's rows).")
    long_examples: Literal["split", "truncate"] = _f(
        "split", "An example longer than data.seq_len: 'split' continues it over the next rows (every token "
        "kept); 'truncate' cuts it to data.seq_len tokens and drops the rest (and no example then crosses a row "
        "boundary: one that does not fit in a row's room starts the next row).")
    max_record_bytes: int = _f(16 * 1024 * 1024, "Longest jsonl line read, in bytes; a longer one is a bad record "
                               "(data.on_bad_record). Lines are read in bounded chunks, never whole beyond this.")
    chat_template: Literal["auto", "desmoe"] = _f(
        "auto", "Chat records: 'auto' renders them with the tokenizer's own chat template when it has one (loss on "
        "the assistant turns), else with desmoe's <|role|> headers; 'desmoe' always uses desmoe's headers.")
    on_bad_record: Literal["error", "skip"] = _f("error", "A malformed record stops the run with its file:line "
                                                 "('error'), or is counted, reported and skipped ('skip').")
    sync_domains: bool = _f(True, "Every rank trains on the same domain at each micro-step (a seeded draw); false "
                            "draws each rank's domain independently (needs method.isolation: token with EP).")
    tokenizer: Optional[str] = _f(None, "'byte' (UTF-8 bytes, 259 ids); 'sentencepiece' (trained once on the "
                                  "configured domains, cached in .cache/desmoe); a sentencepiece .model file; or a "
                                  "local HF tokenizer directory. Default: model.path's tokenizer, else 'byte'.")
    spm_vocab_size: int = _f(2048, "Vocabulary of the sentencepiece model desmoe trains (data.tokenizer: sentencepiece).")


@dataclass
class MethodSection:
    mode: str = _f("fft", "Training mode: " + ", ".join(METHOD_MODES) + ". fft = full fine-tuning; desmoe = "
                   "adaptive router + domain-guided expert specialisation + three phases; desmoe_no_alr / "
                   "desmoe_no_dges = the ablations without the adaptive router / without expert masks; esft_gate / esft_token = "
                   "expert-specialised fine-tuning; lora = low-rank adapters through peft (method.lora_*).")
    warmup_end: float = _f(0.2, "End of warm-up as a fraction of train.max_steps (T1/T). What each phase trains is "
                           "method.phase_trainable (default: warm-up trains router + ALR + every routed expert).")
    stabilization_end: float = _f(0.7, "End of stabilization (T2/T): by default router + ALR + the batch domain's "
                                  "selected experts train until here, then the selected experts only.")
    phase_trainable: Optional[dict] = _f(None, "What each phase trains, phase -> list of router, experts (every routed "
                                         "expert), selected_experts (the batch domain's), backbone (attention, norms, "
                                         "embeddings, lm_head, dense MLPs). Unset: the paper's table {warmup: [router, "
                                         "experts], stabilization: [router, selected_experts], consolidation: "
                                         "[selected_experts]}; a phase given here replaces its row. desmoe's schedule "
                                         "before 0.2: {warmup: [router, backbone]}.")
    shared_experts: Literal["warmup", "never", "always"] = _f(
        "warmup", "When shared (always-on) experts train: 'warmup' (with the routed experts, frozen afterwards), "
        "'never' or 'always'.")
    backbone_lr_scale: float = _f(1.0, "LR multiplier of the backbone in the phases that train it (phase_trainable); "
                                  "e.g. 0.1 with backbone in every phase for a small backbone LR.")
    router_hidden: Optional[int] = _f(None, "Hidden width of the adaptive router's residual MLP; default 4 x d_model.")
    kd_tau: float = _f(0.7, "Distillation temperature tau of L_KD = tau^2 KL(teacher || student).")
    kd_alpha_end: float = _f(1.0, "Distillation weight lambda = max(0, 1 - alpha / kd_alpha_end), alpha = t/T: the "
                             "paper's 1 - alpha by default; 0.7 (= stabilization_end) was desmoe's before 0.2.")
    kd_layer_reduction: Literal["sum", "mean"] = _f(
        "sum", "How the MoE layers' L_KD terms combine: 'sum' (each router gets its own lambda L_KD, as the paper "
        "writes the loss per router) or 'mean' (desmoe before 0.2).")
    kd_weight: float = _f(1.0, "Extra factor on the distillation term: router gradient = (1 - lambda) task + "
                          "kd_weight x lambda x KD.")
    affinity_update_every: int = _f(20, "T_update: steps between affinity EMA updates (and mask reselection).")
    affinity_beta: float = _f(0.9, "beta of the affinity EMA: weight of the newest window.")
    phi: float = _f(0.6, "Relative threshold: domain d trains expert e iff affinity[d, e] >= phi x max_e' affinity[d, e'].")
    isolation: Literal["expert", "token"] = _f("expert", "Gradient isolation granularity: 'expert' masks whole expert "
                                               "rows per micro-batch (needs the same domain on every rank of an EP "
                                               "group: data.sync_domains); 'token' masks per token, for mixed domains.")
    skip_frozen_grads: bool = _f(True, "Skip the weight-gradient work of the parts a phase freezes (by default the "
                                 "backbone in every phase, the router in consolidation). They stay frozen either way "
                                 "(LR 0 in their optimizer group).")
    selection: Literal["relative", "cumulative_token", "cumulative_gate"] = _f(
        "relative", "How desmoe picks each domain's experts from the affinity: 'relative' (phi x the domain's best), "
        "or ESFT's rule: by descending token ratio ('cumulative_token') or mean gate weight ('cumulative_gate') "
        "until the cumulative share >= selection_p.")
    selection_p: float = _f(0.2, "p of the cumulative selections.")
    esft_p: Optional[float] = _f(None, "ESFT modes: take experts by descending score until their cumulative share "
                                 ">= p; default 0.1 for esft_gate, 0.2 for esft_token (the paper's baselines).")
    esft_profile_tokens: int = _f(131072, "ESFT modes: tokens per domain routed (no training) to score the experts.")
    lora_rank: int = _f(8, "lora mode: rank r of each adapter (the paper's LoRA baseline: 8).")
    lora_alpha: float = _f(16.0, "lora mode: scaling alpha; the adapter's update is (alpha / r) B A.")
    lora_dropout: float = _f(0.05, "lora mode: dropout on the adapters' input during training.")
    lora_target_modules: Optional[list] = _f(
        None, "lora mode: the linear modules that get adapters, by name (q_proj) or dotted path "
        "(model.layers.0.self_attn.q_proj). Default: every attention projection, plus shared experts and dense MLPs "
        "where the model has them. Routed experts and the router cannot take adapters (AutoEP rebuilds them).")
    lora_train_router: bool = _f(False, "lora mode: also train the routers' weights in full (frozen by default).")


@dataclass
class CheckpointSection:
    save_final: bool = _f(True, "Save a checkpoint in <run>/checkpoints at the end.")
    every: int = _f(0, "Save a checkpoint every N optimizer steps (0: only at the end, if save_final).")
    keep: int = _f(2, "Keep the newest N complete checkpoints; older ones are deleted once a newer one is complete.")
    trust_pickle: bool = _f(False, "Load checkpoints with full unpickling (DeepSpeed's default) instead of as data "
                            "only (torch.load weights_only=True). Only for checkpoints from a source you trust.")


@dataclass
class EvalSection:
    every: int = _f(0, "Evaluate every N optimizer steps during training (0: only before and after).")
    max_new_tokens: int = _f(32, "Greedy tokens generated per prompt for exact match / chrF (capped at the longest "
                             "reference + 1).")
    max_pairs: int = _f(32, "Prompt/reference pairs per domain scored by generation.")
    best_metric: str = _f("loss", "What 'best' means for eval.keep_best: 'loss' (mean domain loss), "
                          "'mean/<metric>' (e.g. mean/token_accuracy) or '<domain>/<metric>' (e.g. math/exact_match).")
    keep_best: bool = _f(False, "Keep the checkpoint of the best periodic evaluation in checkpoints/best.")


@dataclass
class TrackingSection:
    mlflow: bool = _f(True, "Log parameters, metrics and artifacts to MLflow from rank 0.")
    uri: Optional[str] = _f(None, "MLflow tracking URI (http://host:port of a server, or sqlite:///path.db). "
                           "Default: an embedded sqlite store, sqlite:///<parent of the run directory>/mlflow.db.")
    experiment: str = _f("desmoe", "MLflow experiment name.")


@dataclass
class Config:
    run: RunSection = _f(factory=RunSection, help="Run identity, seed, output directory.")
    model: ModelSection = _f(factory=ModelSection, help="Which model to fine-tune.")
    parallel: ParallelSection = _f(factory=ParallelSection, help="Expert parallelism and ZeRO.")
    train: TrainSection = _f(factory=TrainSection, help="Optimisation and batch sizes.")
    data: DataSection = _f(factory=DataSection, help="Domain-labelled training data.")
    method: MethodSection = _f(factory=MethodSection, help="Training method.")
    checkpoint: CheckpointSection = _f(factory=CheckpointSection, help="Checkpointing.")
    eval: EvalSection = _f(factory=EvalSection, help="Evaluation during and after training.")
    tracking: TrackingSection = _f(factory=TrackingSection, help="Experiment tracking (MLflow).")

    # Where the YAML came from; relative paths in it are resolved against its folder.
    source: Optional[str] = field(default=None, repr=False, metadata={"internal": True})

    def to_dict(self) -> dict:
        out = {}
        for f in dataclasses.fields(self):
            if f.metadata.get("internal"):
                continue
            out[f.name] = dataclasses.asdict(getattr(self, f.name))
        return out


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------


class _SafeLineLoader(yaml.SafeLoader):
    """SafeLoader (no Python tags) that refuses duplicate keys."""


def _construct_mapping(loader, node, deep=False):
    seen = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r} (first at line {seen[key] + 1})", key_node.start_mark)
        seen[key] = key_node.start_mark.line
    return loader.construct_mapping(node, deep=deep)


_SafeLineLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def load_yaml_file(path: str) -> dict:
    """Read a YAML mapping with safe loading; ConfigError naming the file and line on failure."""
    if not os.path.exists(path):
        raise ConfigError([f"config file {path!r} does not exist. Pass the path of a YAML file, e.g. "
                           "--config configs/demo.yaml."])
    if not os.path.isfile(path):
        raise ConfigError([f"config path {path!r} is not a file. Pass the path of a YAML file."])
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError([f"cannot read config file {path!r}: {e}. Check its permissions and that it is UTF-8."])
    try:
        data = yaml.load(text, Loader=_SafeLineLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "unknown line"
        raise ConfigError([f"YAML syntax error at {line}: {e.problem or e}. Fix the YAML at that line."],
                          source=path)
    except yaml.YAMLError as e:
        raise ConfigError([f"YAML error: {e}. Fix the file."], source=path)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError([f"the top level must be a mapping of sections (run, model, train, ...), "
                           f"got {type(data).__name__}."], source=path)
    return data


def parse_override(text: str) -> tuple[list[str], Any]:
    """``section.key=value`` -> (["section", "key"], value parsed as YAML scalar/flow)."""
    if "=" not in text:
        raise ConfigError([f"override {text!r} is not section.key=value (e.g. train.max_steps=20)."])
    key, raw = text.split("=", 1)
    parts = key.strip().split(".")
    if len(parts) < 2 or not all(parts):
        raise ConfigError([f"override {text!r}: the key must name a section and a field, "
                           "e.g. train.max_steps=20."])
    try:
        value = yaml.safe_load(raw) if raw.strip() != "" else None
    except yaml.YAMLError as e:
        raise ConfigError([f"override {text!r}: value {raw!r} is not valid YAML ({e}). Quote strings "
                           "that contain ':' or '#'."])
    return parts, value


def apply_overrides(data: dict, overrides: list[str]) -> tuple[dict, set[tuple[str, ...]]]:
    """Set each ``a.b.c=value`` into a copy of ``data``; returns it and the set of overridden keys."""

    data = copy.deepcopy(data)
    touched: set[tuple[str, ...]] = set()
    problems = []
    for text in overrides:
        try:
            parts, value = parse_override(text)
        except ConfigError as e:
            problems += e.problems
            continue
        node = data
        for p in parts[:-1]:
            if not isinstance(node.get(p), dict):
                if p in node and node[p] is not None:
                    problems.append(f"override {text!r}: {p} is not a section (it holds {node[p]!r}).")
                    break
                node[p] = {}
            node = node[p]
        else:
            node[parts[-1]] = value
            touched.add(tuple(parts))
    if problems:
        raise ConfigError(problems)
    return data, touched


def _type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin is typing.Union:
        return " | ".join(_type_name(a) for a in typing.get_args(tp) if a is not type(None)) + " (or null)"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp) -> tuple[bool, Any]:
    """Check ``value`` against a field type; returns (ok, value) with ints accepted for floats."""
    origin = typing.get_origin(tp)
    if origin is typing.Union:
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return True, None
        for a in args:
            if a is type(None):
                continue
            ok, v = _coerce(value, a)
            if ok:
                return True, v
        return False, value
    if origin is Literal:
        return (value in typing.get_args(tp) and type(value) in {type(a) for a in typing.get_args(tp)}), value
    if tp is bool:
        return isinstance(value, bool), value
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if tp is float:
        if isinstance(value, bool):
            return False, value
        if isinstance(value, (int, float)):
            return True, float(value)
        if isinstance(value, str):
            # NOTE: YAML 1.1 reads "1e-4" as a string; accept numeric strings for float fields.
            try:
                return True, float(value)
            except ValueError:
                return False, value
        return False, value
    if tp is str:
        return isinstance(value, str), value
    if tp is dict:
        return isinstance(value, dict), value
    if tp is list:
        return isinstance(value, list), value
    return True, value


def _fill_section(cls, raw: Any, prefix: str, problems: list[str]):
    hints = typing.get_type_hints(cls)
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        problems.append(f"{prefix}: expected a mapping of keys, got {raw!r}. Write it as '{prefix}:' followed by "
                        "indented key: value lines.")
        return cls()
    names = [f.name for f in dataclasses.fields(cls) if not f.metadata.get("internal")]
    kwargs = {}
    for key, value in raw.items():
        if key not in names:
            close = _closest(str(key), names)
            hint = f" Did you mean {prefix}.{close}?" if close else ""
            problems.append(f"{prefix}.{key}: unknown key.{hint} Known keys in {prefix}: {', '.join(names)}.")
            continue
        ok, coerced = _coerce(value, hints[key])
        if not ok:
            problems.append(f"{prefix}.{key}: {value!r} is not of type {_type_name(hints[key])}. "
                            f"Set it to a {_type_name(hints[key])}.")
            continue
        kwargs[key] = coerced
    return cls(**kwargs)


def _closest(word: str, choices: list[str]) -> str | None:

    match = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    return match[0] if match else None


def config_from_dict(data: dict, *, source: str | None = None) -> Config:
    """Build a Config from a plain mapping (unknown keys and wrong types are ConfigErrors)."""
    problems: list[str] = []
    sections = {f.name: f for f in dataclasses.fields(Config) if not f.metadata.get("internal")}
    hints = typing.get_type_hints(Config)
    kwargs = {}
    for key, value in data.items():
        if key not in sections:
            close = _closest(str(key), list(sections))
            hint = f" Did you mean {close}?" if close else ""
            problems.append(f"{key}: unknown section.{hint} Known sections: {', '.join(sections)}.")
            continue
        kwargs[key] = _fill_section(hints[key], value, key, problems)
    cfg = Config(**kwargs, source=source)
    # Domain entries are nested dataclasses.
    domains = {}
    raw_domains = cfg.data.domains
    for name, entry in (raw_domains or {}).items():
        if not isinstance(name, str) or not name:
            problems.append(f"data.domains: domain name {name!r} must be a non-empty string.")
            continue
        if name == "holdout":
            problems.append("data.domains.holdout: 'holdout' is reserved for data.holdout (evaluated, never "
                            "trained). Rename the domain.")
            continue
        domains[name] = _fill_section(DomainSection, entry, f"data.domains.{name}", problems)
    cfg.data.domains = domains
    if cfg.data.holdout is not None:
        cfg.data.holdout = _fill_section(DomainSection, cfg.data.holdout, "data.holdout", problems)
    if cfg.data.discover is not None:
        cfg.data.discover = _fill_section(DiscoverSection, cfg.data.discover, "data.discover", problems)
    if problems:
        raise ConfigError(problems, source=source)
    return cfg


def load_config(path: str, overrides: list[str] | None = None) -> Config:
    """Load a YAML file, apply ``key=value`` overrides, resolve relative paths and validate (world-free checks).

    Relative paths written in the YAML are resolved against the YAML file's folder; relative
    paths given as overrides, against the current directory.
    """
    data = load_yaml_file(path)
    data, touched = apply_overrides(data, overrides or [])
    cfg = config_from_dict(data, source=path)
    _resolve_paths(cfg, base=os.path.dirname(os.path.abspath(path)), overridden=touched)
    validate(cfg)
    return cfg


def _resolve_paths(cfg: Config, *, base: str, overridden: set[tuple[str, ...]]) -> None:
    def fix(value: str | None, key: tuple[str, ...]) -> str | None:
        if value is None or os.path.isabs(value):
            return value
        value = os.path.expanduser(value)
        if os.path.isabs(value):
            return value
        root = os.getcwd() if key in overridden else base
        return os.path.normpath(os.path.join(root, value))

    cfg.model.path = fix(cfg.model.path, ("model", "path"))
    cfg.parallel.ds_config = fix(cfg.parallel.ds_config, ("parallel", "ds_config"))
    cfg.data.train = fix(cfg.data.train, ("data", "train"))
    if cfg.data.tokenizer not in (None, "byte", "sentencepiece"):
        cfg.data.tokenizer = fix(cfg.data.tokenizer, ("data", "tokenizer"))
    for name, d in cfg.data.domains.items():
        d.train = fix(d.train, ("data", "domains", name, "train"))
        d.eval = fix(d.eval, ("data", "domains", name, "eval"))
    if cfg.data.holdout is not None:
        cfg.data.holdout.train = fix(cfg.data.holdout.train, ("data", "holdout", "train"))
    if cfg.data.discover is not None:
        cfg.data.discover.labels = fix(cfg.data.discover.labels, ("data", "discover", "labels"))
    # output_dir is relative to where the user runs, like --output-dir.
    if cfg.run.output_dir is not None:
        cfg.run.output_dir = os.path.abspath(os.path.expanduser(cfg.run.output_dir))


def validate(cfg: Config, *, world_size: int | None = None, num_experts: int | None = None) -> None:
    """Every consistency check; raises one ConfigError listing all problems (section by section).

    ``world_size`` and ``num_experts`` are known only once ranks and the model exist; the
    checks that need them run when they are given.
    """
    p: list[str] = []
    _validate_model(cfg.model, p)
    _validate_parallel(cfg.parallel, p)
    _validate_train(cfg.train, p)
    _validate_data(cfg.data, p)
    _validate_method(cfg, p)
    _validate_eval_checkpoint_tracking(cfg, p)
    _validate_across_sections(cfg, p, world_size=world_size, num_experts=num_experts)
    if p:
        raise ConfigError(p, source=cfg.source)


def _validate_model(m: ModelSection, p: list[str]) -> None:
    if (m.path is None) == (m.tiny is None):
        p.append("model: set exactly one of model.path (a local HF model directory) or model.tiny "
                 f"(a random model), got path={m.path!r} and tiny={'set' if m.tiny is not None else None}.")
    if m.tiny is not None:
        try:
            tiny_config_kwargs(m.tiny)
        except ModelError as e:
            p.append(str(e))


def _validate_parallel(par: ParallelSection, p: list[str]) -> None:
    if par.ep_size < 1:
        p.append(f"parallel.ep_size: {par.ep_size} must be >= 1 (1 = every rank holds every expert).")
    if par.ds_config is not None and not os.path.isfile(par.ds_config):
        p.append(f"parallel.ds_config: {par.ds_config!r} does not exist. Point it at a DeepSpeed JSON such as "
                 "ds_configs/cpu_fp32.json, or leave it unset for the default.")
    if par.timeout_s < 10:
        p.append(f"parallel.timeout_s: {par.timeout_s} must be >= 10 seconds.")


def _validate_train(t: TrainSection, p: list[str]) -> None:
    for key in ("max_steps", "micro_batch_size", "grad_accum_steps", "log_every"):
        v = getattr(t, key)
        if v < 1:
            p.append(f"train.{key}: {v} must be >= 1.")
    if t.lr <= 0:
        p.append(f"train.lr: {t.lr} must be > 0.")
    if t.weight_decay < 0:
        p.append(f"train.weight_decay: {t.weight_decay} must be >= 0.")
    if t.warmup_steps < 0 or t.warmup_steps > t.max_steps:
        fix = (f" Add the override train.warmup_steps={t.max_steps} (or less), or raise train.max_steps."
               if t.warmup_steps > t.max_steps >= 1 else "")
        p.append(f"train.warmup_steps: {t.warmup_steps} must be between 0 and train.max_steps ({t.max_steps}).{fix}")
    if not 0.0 <= t.min_lr_ratio <= 1.0:
        p.append(f"train.min_lr_ratio: {t.min_lr_ratio} must be between 0 and 1.")
    if t.grad_clip < 0:
        p.append(f"train.grad_clip: {t.grad_clip} must be >= 0 (0 disables clipping).")
    if len(t.betas) != 2 or not all(isinstance(b, (int, float)) and 0 <= b < 1 for b in t.betas):
        p.append(f"train.betas: {t.betas!r} must be two numbers in [0, 1), e.g. [0.9, 0.95].")
    if t.max_bad_steps < 1:
        p.append(f"train.max_bad_steps: {t.max_bad_steps} must be >= 1.")


def _validate_data(d: DataSection, p: list[str]) -> None:
    if d.seq_len < 8:
        p.append(f"data.seq_len: {d.seq_len} must be >= 8.")
    if d.eval_sequences < 1:
        p.append(f"data.eval_sequences: {d.eval_sequences} must be >= 1.")
    if d.discover is not None:
        _validate_discover(d, p)
    elif not d.domains:
        p.append("data.domains: no domains configured. List at least one, e.g. data.domains.math.train: "
                 "data/math.jsonl (or builtin: math), or set data.discover to find domains in unlabelled data.train.")
    for name, dom in d.domains.items():
        key = f"data.domains.{name}"
        if dom.train is not None and dom.builtin is not None:
            p.append(f"{key}: set train (a file) or builtin (a sample corpus), not both.")
        if dom.train is None and dom.builtin is None and d.train is None:
            p.append(f"{key}: no data. Set {key}.train to a jsonl file, {key}.builtin to a sample corpus, "
                     "or data.train to a mixed file with domain labels.")
        if dom.builtin is not None:
            if dom.builtin not in BUILTIN_DOMAINS:
                p.append(f"{key}.builtin: {dom.builtin!r} is not a built-in corpus. Choose one of "
                         f"{', '.join(sorted(BUILTIN_DOMAINS))}.")
        if dom.weight <= 0:
            p.append(f"{key}.weight: {dom.weight} must be > 0.")
        if dom.max_examples is not None and dom.max_examples < 1:
            p.append(f"{key}.max_examples: {dom.max_examples} must be >= 1 (or unset).")
        if dom.metric in ("exact_match", "chrf"):
            if (dom.builtin is None and dom.format == "text") or (
                    dom.builtin is not None and TASK_METRICS.get(dom.builtin) == ("token_accuracy",)):
                what = f"the built-in corpus {dom.builtin!r}" if dom.builtin is not None else "format text"
                p.append(f"{key}.metric: {dom.metric} compares generated answers with reference answers, which "
                         f"{what} does not have. Use metric token_accuracy, or prompt_response / chat records.")
    if d.holdout is not None:
        h = d.holdout
        if (h.train is None) == (h.builtin is None):
            p.append("data.holdout: set exactly one of train (a file) or builtin (e.g. builtin: general).")
        for k in ("eval", "metric"):
            if getattr(h, k) is not None:
                p.append(f"data.holdout.{k}: not used by the holdout (it is evaluated whole, by loss). Remove it.")
        if h.builtin is not None:
            if h.builtin not in BUILTIN_DOMAINS:
                p.append(f"data.holdout.builtin: {h.builtin!r} is not a built-in corpus. Choose one of "
                         f"{', '.join(sorted(BUILTIN_DOMAINS))}.")
    if d.holdout_sequences < 1:
        p.append(f"data.holdout_sequences: {d.holdout_sequences} must be >= 1.")
    if d.tokenizer not in (None, "byte", "sentencepiece") and not (
            os.path.isdir(d.tokenizer) or (d.tokenizer.endswith(".model") and os.path.isfile(d.tokenizer))):
        p.append(f"data.tokenizer: {d.tokenizer!r} is not 'byte', 'sentencepiece', an existing sentencepiece "
                 ".model file or a tokenizer directory. Use one of those, or leave it unset.")
    if d.max_record_bytes < 1024:
        p.append(f"data.max_record_bytes: {d.max_record_bytes} must be >= 1024 (default 16777216 = 16 MiB).")
    if d.spm_vocab_size < 260:
        p.append(f"data.spm_vocab_size: {d.spm_vocab_size} must be >= 260 (256 byte-fallback pieces + specials).")


def _validate_discover(d: DataSection, p: list[str]) -> None:
    g = d.discover
    if g.labels is None:
        if d.train is None:
            p.append("data.discover: needs data.train, the (unlabelled) records to cluster: a jsonl/parquet file, glob "
                     "or save_to_disk folder.")
        if d.domains:
            p.append(f"data.domains: {', '.join(d.domains)} listed with data.discover, which names the domains itself "
                     f"({g.name_prefix}_0, {g.name_prefix}_1, ...). Remove data.domains, or remove data.discover to "
                     "train on labelled data.")
    else:
        if not os.path.isfile(g.labels):
            p.append(f"data.discover.labels: {g.labels!r} is not a file. Point it at the records.jsonl of a desmoe "
                     "discover output (or unset it to discover).")
        if d.train is not None and os.path.abspath(d.train) != os.path.abspath(g.labels):
            p.append(f"data.train: {d.train!r} with data.discover.labels {g.labels!r}: a run trains on the labelled "
                     "records. Unset data.train (or set it to the same file).")
    if g.clusters is not None and g.clusters < 2:
        p.append(f"data.discover.clusters: {g.clusters} must be >= 2 (or unset to choose K by silhouette).")
    if g.clusters is None and not 2 <= g.min_clusters <= g.max_clusters:
        p.append(f"data.discover.min_clusters / max_clusters: {g.min_clusters} / {g.max_clusters} must satisfy "
                 "2 <= min_clusters <= max_clusters.")
    if g.max_examples is not None and g.max_examples < 2:
        p.append(f"data.discover.max_examples: {g.max_examples} must be >= 2 (or unset).")
    if g.max_tokens < 1:
        p.append(f"data.discover.max_tokens: {g.max_tokens} must be >= 1.")
    if not g.name_prefix or not all(c.isalnum() or c in "_-" for c in g.name_prefix):
        p.append(f"data.discover.name_prefix: {g.name_prefix!r} must be non-empty letters, digits, '_' or '-'.")


def _validate_eval_checkpoint_tracking(cfg: Config, p: list[str]) -> None:
    ev = cfg.eval
    if ev.every < 0:
        p.append(f"eval.every: {ev.every} must be >= 0 (0 evaluates only before and after training).")
    for key in ("max_new_tokens", "max_pairs"):
        if getattr(ev, key) < 1:
            p.append(f"eval.{key}: {getattr(ev, key)} must be >= 1.")
    metric = ev.best_metric.rpartition("/")[2]
    if ev.best_metric != "loss" and ("/" not in ev.best_metric or metric not in
                                     ("loss", "ppl", "token_accuracy", "exact_match", "chrf")):
        p.append(f"eval.best_metric: {ev.best_metric!r} is not 'loss', 'mean/<metric>' or '<domain>/<metric>' with "
                 "metric one of loss, ppl, token_accuracy, exact_match, chrf.")
    if ev.keep_best and ev.every == 0:
        p.append("eval.keep_best: true needs periodic evaluation: set eval.every.")
    ck = cfg.checkpoint
    if ck.every < 0:
        p.append(f"checkpoint.every: {ck.every} must be >= 0 (0 saves only at the end).")
    if ck.keep < 1:
        p.append(f"checkpoint.keep: {ck.keep} must be >= 1.")
    if cfg.tracking.uri is not None and not cfg.tracking.uri.strip():
        p.append("tracking.uri: empty. Give a server (http://host:port), a store (sqlite:///path.db), or unset it.")


def _validate_across_sections(cfg: Config, p: list[str], *, world_size: int | None, num_experts: int | None) -> None:
    """Checks that tie sections together, or need the world size / the model's expert count."""
    par, t, d = cfg.parallel, cfg.train, cfg.data
    if (not d.sync_domains and par.ep_size > 1 and cfg.method.mode in ("desmoe", "desmoe_no_alr")
            and cfg.method.isolation == "expert"):
        p.append("data.sync_domains: false lets ranks of one expert-parallel group train on different domains, "
                 "which per-expert isolation cannot separate (an expert computes every rank's tokens). Set "
                 "method.isolation: token, or data.sync_domains: true.")
    if world_size is not None and par.ep_size >= 1:
        if world_size % par.ep_size != 0:
            divisors = [k for k in range(1, world_size + 1) if world_size % k == 0]
            p.append(f"parallel.ep_size: {par.ep_size} does not divide the world size {world_size}. "
                     f"Use one of {divisors}, or launch a multiple of {par.ep_size} processes.")
        elif t.global_batch_size is not None:
            expected = t.micro_batch_size * t.grad_accum_steps * world_size
            if t.global_batch_size != expected:
                p.append(f"train.global_batch_size: {t.global_batch_size} != micro_batch_size "
                         f"({t.micro_batch_size}) x grad_accum_steps ({t.grad_accum_steps}) x world size "
                         f"({world_size}) = {expected}. Change one of them or unset global_batch_size.")
    if num_experts is not None and par.ep_size >= 1 and num_experts % par.ep_size != 0:
        divisors = [k for k in range(1, num_experts + 1) if num_experts % k == 0]
        p.append(f"parallel.ep_size: {par.ep_size} does not divide the model's {num_experts} routed experts. "
                 f"Use one of {divisors}.")


def _validate_method(cfg: Config, p: list[str]) -> None:
    if cfg.method.mode not in METHOD_MODES:
        p.append(f"method.mode: {cfg.method.mode!r} is not a training mode. Choose one of "
                 f"{', '.join(METHOD_MODES)}.")
    m = cfg.method
    if not 0.0 <= m.warmup_end < m.stabilization_end <= 1.0:
        p.append(f"method.warmup_end / method.stabilization_end: {m.warmup_end} / {m.stabilization_end} must satisfy "
                 "0 <= warmup_end < stabilization_end <= 1 (fractions of train.max_steps).")
    p.extend(check_phase_trainable(m.phase_trainable))
    if m.backbone_lr_scale < 0:
        p.append(f"method.backbone_lr_scale: {m.backbone_lr_scale} must be >= 0.")
    if m.kd_alpha_end <= 0:
        p.append(f"method.kd_alpha_end: {m.kd_alpha_end} must be > 0 (lambda = max(0, 1 - alpha / kd_alpha_end)).")
    if m.kd_weight < 0:
        p.append(f"method.kd_weight: {m.kd_weight} must be >= 0.")
    if m.router_hidden is not None and m.router_hidden < 1:
        p.append(f"method.router_hidden: {m.router_hidden} must be >= 1 (or unset for 4 x d_model).")
    if m.kd_tau <= 0:
        p.append(f"method.kd_tau: {m.kd_tau} must be > 0.")
    if m.affinity_update_every < 1:
        p.append(f"method.affinity_update_every: {m.affinity_update_every} must be >= 1.")
    if not 0.0 < m.affinity_beta <= 1.0:
        p.append(f"method.affinity_beta: {m.affinity_beta} must be in (0, 1].")
    if not 0.0 < m.phi <= 1.0:
        p.append(f"method.phi: {m.phi} must be in (0, 1].")
    if not 0.0 < m.selection_p <= 1.0:
        p.append(f"method.selection_p: {m.selection_p} must be in (0, 1].")
    if m.esft_p is not None and not 0.0 < m.esft_p <= 1.0:
        p.append(f"method.esft_p: {m.esft_p} must be in (0, 1] (or unset for the mode's default).")
    if m.esft_profile_tokens < 1:
        p.append(f"method.esft_profile_tokens: {m.esft_profile_tokens} must be >= 1.")
    if m.lora_rank < 1:
        p.append(f"method.lora_rank: {m.lora_rank} must be >= 1.")
    if m.lora_alpha <= 0:
        p.append(f"method.lora_alpha: {m.lora_alpha} must be > 0.")
    if not 0.0 <= m.lora_dropout < 1.0:
        p.append(f"method.lora_dropout: {m.lora_dropout} must be in [0, 1).")
    if m.lora_target_modules is not None and (not m.lora_target_modules or not all(
            isinstance(t, str) and t for t in m.lora_target_modules)):
        p.append(f"method.lora_target_modules: {m.lora_target_modules!r} must be a non-empty list of module names "
                 "(e.g. [q_proj, v_proj]), or unset for the default.")


def dump_config(cfg: Config) -> str:
    """The resolved config as YAML (what is written to <run>/config.yaml)."""
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


def describe() -> str:
    """Every section and key with its default and help text (``desmoe config``)."""
    lines = []
    hints = typing.get_type_hints(Config)
    for f in dataclasses.fields(Config):
        if f.metadata.get("internal"):
            continue
        lines.append(f"{f.name}:  # {f.metadata.get('help', '')}")
        for sf in dataclasses.fields(hints[f.name]):
            default = sf.default if sf.default is not dataclasses.MISSING else sf.default_factory()
            lines.append(f"  {sf.name}: {default!r}  # {sf.metadata.get('help', '')}")
    lines.append("data.domains.<name>:")
    for sf in dataclasses.fields(DomainSection):
        lines.append(f"  {sf.name}: {sf.default!r}  # {sf.metadata.get('help', '')}")
    lines.append("data.discover:")
    for sf in dataclasses.fields(DiscoverSection):
        lines.append(f"  {sf.name}: {sf.default!r}  # {sf.metadata.get('help', '')}")
    return "\n".join(lines)
