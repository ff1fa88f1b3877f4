"""Label-free domains: cluster the records of ``data.train`` by how the base model routes them.

    desmoe discover --config CONFIG --out DIR      (or data.discover in a run's config: desmoe train)

1. read_examples: the records of data.train (a jsonl/parquet file, glob or save_to_disk folder) as
   examples; ``data.on_bad_record``, ``data.max_record_bytes`` and ``data.discover.max_examples`` apply.
   Records that already carry a "domain" label are clustered like the rest: their label is ignored for
   training and kept as "given_domain" (the report scores the clusters against them).
2. compute_signatures: each example's routing signature under the plain HF base model (before
   DeepSpeed; whole on every rank): per MoE layer, the share of its first ``max_tokens`` tokens routed to
   each expert ('share', sums to 1 per layer) and, with 'share_gate', the mean gate probability of each
   expert; concatenated over the MoE layers: [N, L*E] or [N, 2*L*E]. Routing is read from each MoE
   block's input as softmax(x W_router^T) and its top-k (k = num_experts_per_tok). That is the routing of
   qwen3_moe, qwen2_moe, mixtral, olmoe and deepseek_v2 'greedy'; families with grouped or sigmoid routing
   (deepseek_v3, deepseek_v2 'group_limited_greedy') are approximated by it.
3. compute_clusters: k-means (scikit-learn) with K = data.discover.clusters, or the K in
   [min_clusters, max_clusters] with the best silhouette; clusters numbered by first appearance in file order.
4. write_discovery: DIR/records.jsonl (each record with "domain": <name_prefix>_<i>), report.json,
   report.md and clusters.png (a PCA projection of the signatures, each cluster's mean signature).

resolve_labels turns a config whose ``data.discover.labels`` names such a records.jsonl into a labelled one
(data.train = the labels, data.domains = the domains they name).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time

import numpy as np
import torch

from desmoe import dist
from desmoe.config import Config, DomainSection
from desmoe.data import (DataError, ScanReport, Segment, encode_example, example_text, expand_sources, read_jsonl,
                         read_records, record_segments)
from desmoe.figures import canvas_figure, save_png
from desmoe.models import Family, ModelError, moe_layer_indices, num_routed_experts

DISCOVERY_DIR = "discovery"
"""A run's discovered domains: <run>/discovery/ (records.jsonl, report.json, report.md, clusters.png)."""
RECORDS_FILE = "records.jsonl"
REPORT_FILE = "report.json"
REPORT_TABLE_FILE = "report.md"
FIGURE_FILE = "clusters.png"
TOKENIZER_FILE = "tokenizer.model"
ROUTING_NOTE = ("softmax(x W_router^T) and its top-k on each MoE block's input: the routing of qwen3_moe, qwen2_moe, "
                "mixtral, olmoe and deepseek_v2 'greedy'; grouped or sigmoid routing (deepseek_v3, deepseek_v2 "
                "'group_limited_greedy') is approximated by it")
SILHOUETTE_SAMPLE = 5000
"""Examples the silhouette score is computed on (a seeded sample beyond this many)."""
REPRESENTATIVES = 3
TEXT_CHARS = 200


class DiscoveryError(DataError):
    """The records of data.train cannot be clustered as configured (too few, or indistinguishable)."""


@dataclasses.dataclass
class Example:
    """One record of data.train and what is routed of it."""

    record: dict
    segments: list[Segment]
    where: str
    """file:line (or file[row i]) of the record."""

    @property
    def given_domain(self) -> str | None:
        label = self.record.get("domain")
        return None if label is None or label == "" else str(label)


@dataclasses.dataclass
class Unlabelled:
    """What read_examples found in data.train."""

    examples: list[Example]
    records: int
    """Records read (at most data.discover.max_examples), bad ones included."""
    skipped: int = 0
    """Bad records skipped (data.on_bad_record: skip)."""
    first_skip: str | None = None
    empty: int = 0
    """Records without text (not clustered, not written)."""

    @property
    def labelled(self) -> int:
        return sum(ex.given_domain is not None for ex in self.examples)

    def segments(self) -> dict[str, list[list[Segment]]]:
        """The examples as build_tokenizer / train_sentencepiece take them."""
        return {"data.train": [ex.segments for ex in self.examples]}


@dataclasses.dataclass
class Clustering:
    labels: np.ndarray
    """[N] cluster of each example, 0..K-1 numbered by first appearance."""
    k: int
    silhouette: dict[int, float | None]
    """Silhouette score of each K fitted (None where undefined: K = N)."""
    centroids: np.ndarray
    """[K, F], in the order of ``labels``."""
    chosen_by: str
    """'data.discover.clusters' or 'silhouette'."""


@dataclasses.dataclass
class Discovery:
    """Everything write_discovery writes (the same on every rank)."""

    unlabelled: Unlabelled
    features: np.ndarray
    """[N, F] routing signatures."""
    clustering: Clustering
    names: list[str]
    """Domain name of each cluster: <name_prefix>_<i>."""
    settings: dict
    """features, max_tokens, seed, model, MoE layers, experts, top-k, routing."""
    seconds: dict
    """signatures / clustering wall time."""

    @property
    def domain_of(self) -> list[str]:
        return [self.names[c] for c in self.clustering.labels]

    def given_agreement(self) -> dict | None:
        """ARI and confusion of the clusters against the given labels (the examples that have one), or None."""
        given = [(ex.given_domain, d) for ex, d in zip(self.unlabelled.examples, self.domain_of)
                 if ex.given_domain is not None]
        if not given:
            return None
        true, pred = [g for g, _ in given], [d for _, d in given]
        return {"examples": len(given), "ari": adjusted_rand(true, pred),
                "confusion": compute_confusion(true, pred, columns=self.names)}

    def domain_examples(self, data_cfg) -> tuple[dict[str, list[list[Segment]]], dict[str, ScanReport]]:
        """The discovered domains' examples as load_domain_examples reads them from records.jsonl (file order);
        ``data_cfg.domains`` must list the discovered domains (label_domains)."""
        examples: dict[str, list[list[Segment]]] = {n: [] for n in self.names}
        for ex, name in zip(self.unlabelled.examples, self.domain_of):
            examples[name].append(ex.segments)
        for name, dom in data_cfg.domains.items():
            if dom.max_examples is not None:
                examples[name] = examples[name][:dom.max_examples]
        report = {n: ScanReport() for n in self.names}
        report["data.train"] = ScanReport(skipped=self.unlabelled.skipped, first_skip=self.unlabelled.first_skip)
        return examples, report


# ---- reading ---------------------------------------------------------------------------------


def needs_discovery(cfg: Config) -> bool:
    """data.discover is set and names no labels yet: the run finds its domains first."""
    return cfg.data.discover is not None and cfg.data.discover.labels is None


def read_examples(data_cfg) -> Unlabelled:
    """The records of ``data.train`` (file order, at most ``data.discover.max_examples``) as examples of format
    ``data.discover.format``; DiscoveryError when none has text."""
    g = data_cfg.discover
    skip = data_cfg.on_bad_record == "skip"
    out = Unlabelled(examples=[], records=0)

    def note_skip(err: DataError) -> None:
        out.skipped += 1
        out.first_skip = out.first_skip or str(err)

    def records():
        for path in expand_sources(data_cfg.train, key="data.train"):
            yield from read_records(path, "data.train", note_skip if skip else None,
                                max_record_bytes=data_cfg.max_record_bytes)

    for where, record in records():
        if g.max_examples is not None and out.records >= g.max_examples:
            break
        out.records += 1
        try:
            segments = record_segments(record, g.format, where)
        except DataError as e:
            if not skip:
                raise
            note_skip(e)
            continue
        if not example_text(segments).strip():
            out.empty += 1
            continue
        out.examples.append(Example(dict(record), segments, where))
    if not out.examples:
        found = (f"{out.records} record(s) read, {out.skipped} skipped as bad, {out.empty} without text"
                 if out.records or out.skipped else "no records")
        raise DiscoveryError(f"data.train: {data_cfg.train} has nothing to cluster ({found}). data.discover needs "
                             f"records of format {g.format!r} with non-empty text; point data.train at them (or set "
                             "data.discover.format to the records' format).")
    return out


def check_clusterable(n_examples: int, g) -> None:
    """The checks on the number of examples that need no model (DiscoveryError)."""
    if g.clusters is not None and g.clusters > n_examples:
        raise DiscoveryError(f"data.discover.clusters: {g.clusters} but data.train has {n_examples} example(s) to "
                             f"cluster. Lower data.discover.clusters to at most {n_examples}, or add records.")
    if g.clusters is None and n_examples <= g.min_clusters:
        raise DiscoveryError(f"data.discover: choosing K by silhouette needs more examples than "
                             f"data.discover.min_clusters ({g.min_clusters}); data.train has {n_examples}. Set "
                             "data.discover.clusters, or add records.")


# ---- signatures ------------------------------------------------------------------------------


def routing_top_k(model_config) -> int:
    """Experts routed per token (the HF config's num_experts_per_tok, every supported family's key)."""
    k = int(getattr(model_config, "num_experts_per_tok", 0) or 0)
    if k < 1:
        raise ModelError(f"model: {getattr(model_config, 'model_type', '?')} config has no num_experts_per_tok, "
                         "so its routing cannot be read for data.discover.")
    return k


def example_ids(segments: list[Segment], tokenizer, *, max_tokens: int, chat_template: str = "auto") -> list[int]:
    """The first ``max_tokens`` ids of an example as training sees it (bos, then its tokens)."""
    ids, _ = encode_example(segments, tokenizer, chat_template=chat_template)
    bos = [tokenizer.bos_id] if tokenizer.bos_id is not None else []
    return (bos + ids)[:max_tokens]


@torch.no_grad()
def compute_signatures(model, family: Family, tokenizer, examples: list[list[Segment]], *, max_tokens: int,
                       features: str = "share", batch_size: int = 8, rank: int = 0, world_size: int = 1,
                       chat_template: str = "auto") -> np.ndarray:
    """Routing signatures [N, L*E] ('share') or [N, 2*L*E] ('share_gate'), float64, on every rank.

    Per example and MoE layer l (in order): share[e] = the fraction of its real tokens (first ``max_tokens``;
    padding not counted) whose top-k experts include e, divided by k (sums to 1); 'share_gate' follows it
    with gate[e] = the mean softmax probability of e over those tokens. A collective: rank r routes examples
    r, r + world_size, ... through the plain HF ``model`` (eval mode), and the rows are summed over ranks.
    """
    if features not in ("share", "share_gate"):
        raise ValueError(f"features {features!r}: 'share' or 'share_gate'")
    layers = moe_layer_indices(model.config, family)
    n_experts = num_routed_experts(model.config, family)
    k = routing_top_k(model.config)
    width = n_experts * (2 if features == "share_gate" else 1)
    out = torch.zeros(len(examples), len(layers) * width, dtype=torch.float64)
    device = next(model.parameters()).device
    decoder = family.decoder_layers(model)
    blocks = [family.moe_block(decoder[i]) for i in layers]
    inputs: dict[int, torch.Tensor] = {}

    def capture(j):
        def hook(module, args, kwargs):
            inputs[j] = args[0] if args else kwargs["hidden_states"]
        return hook

    # NOTE: every rank encodes every example, so an example the tokenizer cannot render stops every rank alike
    # (instead of one rank leaving the others waiting in the all-reduce)
    encoded = [example_ids(ex, tokenizer, max_tokens=max_tokens, chat_template=chat_template) for ex in examples]
    handles = [b.register_forward_pre_hook(capture(j), with_kwargs=True) for j, b in enumerate(blocks)]
    was_training = model.training
    model.eval()
    mine = list(range(rank, len(examples), world_size))
    try:
        for start in range(0, len(mine), batch_size):
            idx = mine[start:start + batch_size]
            seqs = [encoded[i] for i in idx]
            width_t = max(len(s) for s in seqs)
            ids = torch.full((len(idx), width_t), tokenizer.pad_id, dtype=torch.long)
            mask = torch.zeros(len(idx), width_t, dtype=torch.long)
            for r, s in enumerate(seqs):
                ids[r, :len(s)] = torch.tensor(s, dtype=torch.long)
                mask[r, :len(s)] = 1
            model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False)
            real = mask.to(torch.float32).unsqueeze(-1)  # [B, T, 1]
            n_real = real.sum(1)  # [B, 1]
            for j, block in enumerate(blocks):
                h = inputs.pop(j).detach().to("cpu", torch.float32)
                h = h.reshape(len(idx), width_t, -1)  # [B, T, H]
                logits = h @ family.router_weight(block).detach().to("cpu", torch.float32).T  # [B, T, E]
                probs = torch.softmax(logits, dim=-1)
                hits = torch.zeros_like(probs).scatter_(-1, probs.topk(k, dim=-1).indices, 1.0)
                share = (hits * real).sum(1) / (n_real * k)  # [B, E], rows sum to 1
                col = j * width
                out[idx, col:col + n_experts] = share.double()
                if features == "share_gate":
                    out[idx, col + n_experts:col + width] = ((probs * real).sum(1) / n_real).double()
    finally:
        for hd in handles:
            hd.remove()
        model.train(was_training)
    return dist.all_reduce_sum(out).numpy()


# ---- clustering ------------------------------------------------------------------------------


def relabel_by_first_appearance(labels: np.ndarray) -> tuple[np.ndarray, list[int]]:
    """(labels renumbered so that cluster 0 is the first example's, 1 the next new one's, ...; old id of each new)."""
    order: list[int] = []
    seen: set[int] = set()
    for c in labels.tolist():
        if c not in seen:
            seen.add(c)
            order.append(c)
    new = {old: i for i, old in enumerate(order)}
    return np.array([new[c] for c in labels.tolist()], dtype=np.int64), order


def compute_clusters(features: np.ndarray, *, clusters: int | None = None, min_clusters: int = 2,
                     max_clusters: int = 12, seed: int = 0) -> Clustering:
    """k-means (n_init 10, ``seed``) of ``features`` [N, F]: K = ``clusters``, or the K in [min_clusters,
    min(max_clusters, N - 1)] with the highest silhouette score (the smaller K on a tie).

    DiscoveryError when K exceeds the examples or their distinct signatures (every example identical
    included)."""
    from sklearn.cluster import KMeans
    from sklearn.metrics import silhouette_score

    n = features.shape[0]
    if n == 0:
        raise DiscoveryError("data.train: no examples to cluster. Point data.train at records with text.")
    distinct = np.unique(features, axis=0).shape[0]
    if distinct < 2:
        raise DiscoveryError(f"data.discover: all {n} examples of data.train have the same routing signature (the "
                             "base model routes them identically, e.g. identical texts), so there is nothing to "
                             "cluster. Use data with different content, more tokens per example "
                             "(data.discover.max_tokens), or label the domains yourself (data.domains).")
    if clusters is not None:
        if clusters > n:
            raise DiscoveryError(f"data.discover.clusters: {clusters} but data.train has {n} example(s) to cluster. "
                                 f"Lower data.discover.clusters to at most {n}, or add records.")
        if clusters > distinct:
            raise DiscoveryError(f"data.discover.clusters: {clusters} but the {n} examples of data.train have only "
                                 f"{distinct} distinct routing signatures. Lower data.discover.clusters to at most "
                                 f"{distinct}, or add records.")
        ks = [clusters]
    else:
        hi = min(max_clusters, n - 1, distinct)
        if hi < min_clusters:
            raise DiscoveryError(f"data.discover: choosing K by silhouette in [{min_clusters}, {max_clusters}] needs "
                                 f"more than {min_clusters} examples with distinct routing signatures; data.train has "
                                 f"{n} example(s), {distinct} distinct. Set data.discover.clusters, or add records.")
        ks = list(range(min_clusters, hi + 1))
    fits, scores = {}, {}
    for k in ks:
        km = KMeans(n_clusters=k, n_init=10, random_state=seed).fit(features)
        fits[k] = km
        defined = 2 <= len(set(km.labels_.tolist())) <= n - 1
        scores[k] = float(silhouette_score(features, km.labels_, sample_size=min(n, SILHOUETTE_SAMPLE),
                                           random_state=seed)) if defined else None
    if clusters is not None:
        best, chosen_by = clusters, "data.discover.clusters"
    else:
        best = max(ks, key=lambda k: (scores[k] if scores[k] is not None else -2.0, -k))
        chosen_by = "silhouette"
    labels, order = relabel_by_first_appearance(fits[best].labels_)
    return Clustering(labels=labels, k=best, silhouette=scores, centroids=fits[best].cluster_centers_[order],
                      chosen_by=chosen_by)


def adjusted_rand(true: list, pred: list) -> float:
    from sklearn.metrics import adjusted_rand_score

    return float(adjusted_rand_score(true, pred))


def compute_confusion(true: list, pred: list, *, columns: list | None = None) -> dict:
    """{rows: true labels (first appearance), columns: predicted labels, counts: [rows][columns]}."""
    rows = list(dict.fromkeys(true))
    cols = list(columns) if columns is not None else list(dict.fromkeys(pred))
    counts = [[0] * len(cols) for _ in rows]
    for t, p in zip(true, pred):
        counts[rows.index(t)][cols.index(p)] += 1
    return {"rows": rows, "columns": cols, "counts": counts}


def representatives(features: np.ndarray, clustering: Clustering, *, per_cluster: int = REPRESENTATIVES) -> list:
    """Per cluster, the indices of its ``per_cluster`` examples nearest its centroid (nearest first)."""
    out = []
    for c in range(clustering.k):
        members = np.flatnonzero(clustering.labels == c)
        dist_ = np.linalg.norm(features[members] - clustering.centroids[c], axis=1)
        out.append(members[np.argsort(dist_, kind="stable")[:per_cluster]].tolist())
    return out


# ---- the driver ------------------------------------------------------------------------------


def run_discovery(cfg: Config, model, family: Family, tokenizer, unlabelled: Unlabelled, *, rank: int = 0,
                  world_size: int = 1, model_name: str | None = None) -> Discovery:
    """Signatures (every rank routes its share of the examples) and clusters (rank 0, sent to every rank);
    a collective. ``model`` is the plain HF base model (before deepspeed.initialize)."""
    g = cfg.data.discover
    seed = cfg.run.seed if g.seed is None else g.seed
    t0 = time.perf_counter()
    features = compute_signatures(model, family, tokenizer, [ex.segments for ex in unlabelled.examples],
                                  max_tokens=g.max_tokens, features=g.features,
                                  batch_size=max(1, cfg.train.micro_batch_size), rank=rank, world_size=world_size,
                                  chat_template=cfg.data.chat_template)
    t1 = time.perf_counter()
    outcome: Clustering | DiscoveryError
    if rank == 0:
        try:
            outcome = compute_clusters(features, clusters=g.clusters, min_clusters=g.min_clusters,
                                       max_clusters=g.max_clusters, seed=seed)
        except DiscoveryError as e:
            outcome = e
    else:
        outcome = None
    outcome = dist.broadcast_object(outcome)  # every rank stops, or goes on with rank 0's clusters
    if isinstance(outcome, DiscoveryError):
        raise outcome
    clustering = outcome
    layers = moe_layer_indices(model.config, family)
    settings = {"features": g.features, "max_tokens": g.max_tokens, "seed": seed, "format": g.format,
                "model": model_name or cfg.model.path or f"model.tiny ({model.config.model_type})",
                "model_type": model.config.model_type, "moe_layers": layers,
                "num_experts": num_routed_experts(model.config, family), "top_k": routing_top_k(model.config),
                "routing": ROUTING_NOTE, "train": cfg.data.train}
    return Discovery(unlabelled=unlabelled, features=features, clustering=clustering,
                     names=[f"{g.name_prefix}_{i}" for i in range(clustering.k)], settings=settings,
                     seconds={"signatures": t1 - t0, "clustering": time.perf_counter() - t1})


def check_trainable(found: Discovery) -> None:
    """A run trains on every discovered domain and holds eval examples out of each: a cluster of one example
    cannot be both (DiscoveryError)."""
    sizes = np.bincount(found.clustering.labels, minlength=found.clustering.k)
    small = [f"{found.names[i]} ({int(s)})" for i, s in enumerate(sizes) if s < 2]
    if small:
        raise DiscoveryError(f"data.discover: the cluster(s) {', '.join(small)} hold fewer than 2 examples, too few to "
                             f"train on and hold eval examples out of (K = {found.clustering.k}, "
                             f"{found.clustering.chosen_by}). Lower data.discover.clusters (or max_clusters), or "
                             "add records.")


def label_domains(cfg: Config, names: list[str]) -> None:
    """data.domains = the discovered (or labelled) domains, each of format data.discover.format."""
    cfg.data.domains = {n: DomainSection(format=cfg.data.discover.format) for n in names}


def adopt_labels(cfg: Config, out_dir: str, tokenizer_file: str | None = None) -> None:
    """Point ``cfg`` at the labels written in ``out_dir`` (data.discover.labels = data.train = its records.jsonl;
    data.tokenizer = its tokenizer.model when one was written), so a run's config.yaml needs no rediscovery."""
    labels = os.path.join(os.path.abspath(out_dir), RECORDS_FILE)
    cfg.data.discover.labels = labels
    cfg.data.train = labels
    if tokenizer_file is not None:
        cfg.data.tokenizer = tokenizer_file


def resolve_labels(cfg: Config) -> Config:
    """A config with data.discover.labels trains on them: data.train = the labels file and, unless data.domains
    lists some, data.domains = every domain the file names (first appearance). Idempotent; returns ``cfg``."""
    g = cfg.data.discover
    if g is None or g.labels is None:
        return cfg
    cfg.data.train = g.labels
    if not cfg.data.domains:
        label_domains(cfg, label_names(g.labels, max_record_bytes=cfg.data.max_record_bytes))
    return cfg


def label_names(path: str, *, max_record_bytes: int) -> list[str]:
    """The domains a labels file names, in order of first appearance; DiscoveryError on a record without one."""
    names: dict[str, None] = {}
    for lineno, record in read_jsonl(path, key="data.discover.labels", max_record_bytes=max_record_bytes):
        label = record.get("domain")
        if not isinstance(label, str) or not label:
            raise DiscoveryError(f"{path}:{lineno}: no \"domain\" field. data.discover.labels must be the "
                                 "records.jsonl that desmoe discover (or a run's discovery/) wrote.")
        names.setdefault(label, None)
    if not names:
        raise DiscoveryError(f"data.discover.labels: {path} has no records. Point it at the records.jsonl of a "
                             "desmoe discover output.")
    return list(names)


# ---- writing ---------------------------------------------------------------------------------


def check_out_dir(out_dir: str, *, overwrite: bool) -> None:
    """``desmoe discover --out``: a file in the way, or earlier discovered labels without --overwrite, is refused."""
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise DiscoveryError(f"--out {out_dir}: exists and is not a directory. Choose another --out.")
    if os.path.isfile(os.path.join(out_dir, RECORDS_FILE)) and not overwrite:
        raise DiscoveryError(f"--out {out_dir}: already holds discovered labels ({RECORDS_FILE}). Choose another "
                             "--out, or add --overwrite to replace them.")


def _short(text: str, n: int = TEXT_CHARS) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[:n - 1] + "\u2026"


def build_report(found: Discovery) -> dict:
    """report.json's content."""
    u, c = found.unlabelled, found.clustering
    reps = representatives(found.features, c)
    given = found.given_agreement()
    clusters = []
    for i, name in enumerate(found.names):
        members = np.flatnonzero(c.labels == i)
        entry = {"name": name, "size": int(members.size), "share": float(members.size / len(u.examples)),
                 "representatives": [{"where": u.examples[j].where,
                                      "text": _short(example_text(u.examples[j].segments))} for j in reps[i]]}
        if given is not None:
            entry["given_domains"] = {row: counts[i] for row, counts in zip(given["confusion"]["rows"],
                                                                            given["confusion"]["counts"])
                                      if counts[i]}
        clusters.append(entry)
    return {"k": c.k, "chosen_by": c.chosen_by, "silhouette": {str(k): v for k, v in c.silhouette.items()},
            **found.settings, "records_read": u.records, "examples": len(u.examples), "skipped": u.skipped,
            "first_skip": u.first_skip, "empty": u.empty, "labelled": u.labelled,
            "unlabelled": len(u.examples) - u.labelled, "given": given, "clusters": clusters,
            "seconds": found.seconds}


def label_summary(found: Discovery) -> str:
    """How many records carry a domain label and what happens to them (one line)."""
    u = found.unlabelled
    n, labelled = len(u.examples), u.labelled
    if labelled == 0:
        return f"data.discover: {n} records clustered, none with a domain label"
    given = found.given_agreement()
    return (f"data.discover: {labelled} of {n} records carry a domain label; labels are ignored for training (kept "
            f"as given_domain; ARI against them: {given['ari']:.2f})")


def format_summary(found: Discovery, files: dict | None = None) -> str:
    """The report in a few lines: counts, K and the silhouette scores, each cluster's size and first example."""
    u, c = found.unlabelled, found.clustering
    lines = [label_summary(found)]
    if u.skipped or u.empty:
        lines.append(f"  {u.skipped} bad record(s) skipped, {u.empty} without text: not clustered, not written"
                     + (f" (first: {u.first_skip})" if u.first_skip else ""))
    sil = ", ".join(f"{k}: {'-' if v is None else f'{v:.3f}'}" for k, v in c.silhouette.items())
    lines.append(f"K = {c.k} ({c.chosen_by}; silhouette {sil}); signatures {found.settings['features']} of "
                 f"{len(found.settings['moe_layers'])} MoE layers x {found.settings['num_experts']} experts, "
                 f"{found.seconds['signatures']:.1f}s")
    reps = representatives(found.features, c, per_cluster=1)
    for i, name in enumerate(found.names):
        size = int((c.labels == i).sum())
        first = _short(example_text(u.examples[reps[i][0]].segments), 70)
        lines.append(f"  {name:<14} {size:>6} examples  e.g. {first!r}")
    for what, path in (files or {}).items():
        lines.append(f"{what}: {path}")
    return "\n".join(lines)


def _markdown(report: dict) -> str:
    lines = [f"# Discovered domains of {report['train']}", "",
             f"- model: {report['model']} ({report['model_type']}; MoE layers {report['moe_layers']}, "
             f"{report['num_experts']} experts, top-{report['top_k']})",
             f"- signature: {report['features']}, first {report['max_tokens']} tokens of each example; routing read as "
             f"{report['routing']}",
             f"- K = {report['k']} ({report['chosen_by']}), k-means seed {report['seed']}",
             f"- records read {report['records_read']}, clustered {report['examples']}, bad records skipped "
             f"{report['skipped']}, without text {report['empty']}",
             f"- with a domain label: {report['labelled']} (ignored for training, kept as given_domain), without: "
             f"{report['unlabelled']}"]
    if report["given"] is not None:
        lines.append(f"- adjusted Rand index against the given labels ({report['given']['examples']} examples): "
                     f"{report['given']['ari']:.4f}")
    lines += ["", "| K | silhouette |", "|---|---|"]
    lines += [f"| {k} | {'-' if v is None else f'{v:.4f}'} |" for k, v in report["silhouette"].items()]
    lines += ["", "| cluster | examples | share | representative examples (nearest the centroid) |",
              "|---|---|---|---|"]
    for cl in report["clusters"]:
        reps = "<br>".join(f"`{r['where']}`: {r['text'].replace('|', '/')}" for r in cl["representatives"])
        lines.append(f"| {cl['name']} | {cl['size']} | {cl['share']:.1%} | {reps} |")
    if report["given"] is not None:
        conf = report["given"]["confusion"]
        lines += ["", "Given label x cluster:", "", "| given | " + " | ".join(conf["columns"]) + " |",
                  "|---|" + "---|" * len(conf["columns"])]
        lines += [f"| {row} | " + " | ".join(str(v) for v in counts) + " |"
                  for row, counts in zip(conf["rows"], conf["counts"])]
    return "\n".join(lines) + "\n"


def plot_clusters(found: Discovery, path: str) -> str:
    """clusters.png: the signatures' 2-D PCA projection coloured by cluster, and each cluster's mean signature."""
    import matplotlib
    from sklearn.decomposition import PCA

    c, feats = found.clustering, found.features
    fig = canvas_figure(14, 5.5)
    ax, hm = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    xy = PCA(n_components=2, random_state=0).fit_transform(feats) if min(feats.shape) >= 2 else \
        np.column_stack([feats[:, 0], np.zeros(len(feats))])
    cmap = matplotlib.colormaps["tab20" if c.k > 10 else "tab10"]
    for i, name in enumerate(found.names):
        m = c.labels == i
        ax.scatter(xy[m, 0], xy[m, 1], s=8, color=cmap(i % cmap.N), label=f"{name} ({int(m.sum())})", alpha=0.7)
    ax.set_title(f"routing signatures (PCA), K = {c.k}")
    ax.legend(fontsize=7, markerscale=2, loc="best")
    means = np.stack([feats[c.labels == i].mean(0) for i in range(c.k)])
    im = hm.imshow(means, aspect="auto", interpolation="nearest", cmap="viridis")
    per_layer = feats.shape[1] // max(1, len(found.settings["moe_layers"]))
    for j in range(1, len(found.settings["moe_layers"])):
        hm.axvline(j * per_layer - 0.5, color="white", lw=1)
    hm.set_yticks(range(c.k), found.names, fontsize=7)
    hm.set_xlabel(f"MoE layer x expert ({found.settings['features']}; layers {found.settings['moe_layers']})")
    hm.set_title("mean signature per cluster")
    fig.colorbar(im, ax=hm, fraction=0.04)
    fig.tight_layout()
    save_png(fig, path)
    return path


def _write_text(path: str, text: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def write_discovery(out_dir: str, found: Discovery, *, tokenizer_file: str | None = None) -> dict[str, str]:
    """Write records.jsonl (every clustered record in file order with "domain" set, "given_domain" where it had
    one), report.json, report.md, clusters.png and, given ``tokenizer_file``, a copy of it as tokenizer.model.
    Each file is written whole or not at all. Returns {what: path}. Rank 0 only."""
    os.makedirs(out_dir, exist_ok=True)
    files = {"records": os.path.join(out_dir, RECORDS_FILE), "report": os.path.join(out_dir, REPORT_FILE),
             "report_md": os.path.join(out_dir, REPORT_TABLE_FILE), "figure": os.path.join(out_dir, FIGURE_FILE)}
    lines = []
    for ex, name in zip(found.unlabelled.examples, found.domain_of):
        record = dict(ex.record)
        if ex.given_domain is not None:
            record["given_domain"] = record["domain"]
        record["domain"] = name
        lines.append(json.dumps(record, ensure_ascii=False, default=str))
    _write_text(files["records"], "\n".join(lines) + "\n")
    report = build_report(found)
    _write_text(files["report"], json.dumps(report, indent=2, default=str) + "\n")
    _write_text(files["report_md"], _markdown(report))
    plot_clusters(found, files["figure"])
    if tokenizer_file is not None:
        files["tokenizer"] = os.path.join(out_dir, TOKENIZER_FILE)
        if os.path.abspath(tokenizer_file) != os.path.abspath(files["tokenizer"]):
            shutil.copyfile(tokenizer_file, files["tokenizer"] + ".tmp")
            os.replace(files["tokenizer"] + ".tmp", files["tokenizer"])
    return files


def trained_tokenizer_file(cfg: Config, tokenizer) -> str | None:
    """The sentencepiece model desmoe trained for data.tokenizer 'sentencepiece' (kept with the labels), or None."""
    if cfg.data.tokenizer == "sentencepiece":
        return getattr(tokenizer, "path", None)
    return None
