"""Pretrain the small MoE base models that the experiments fine-tune, once, cached on disk.

    python -m benchmarks.pretrain_base [--recipe full|quick|dsv2] [--quick] [--cache DIR] [--force]
                                       [--pydoc-sources DIR]

Prints the model directory. ``ensure_base_model(recipe)`` is the same from Python.

The recipes: ``FULL`` (Qwen3-MoE, described below; ``QUICK`` is smaller and shorter, for the smoke
test) and ``DSV2`` (a DeepSeek-V2-shaped testbed on a larger general corpus, described after).

``FULL``:

- Tokenizer: desmoe's sentencepiece BPE (``desmoe.data.train_sentencepiece``: 2048 ids, byte
  fallback) trained on all seven built-in corpora (the six domains and ``general``), so the base
  model and every fine-tuning run share one vocabulary. Saved as ``tokenizer.model``.
- Data, packed with desmoe's own functions (``encode_example``, ``pack_sequences``) into rows of
  ``seq_len`` tokens:
  * ``general`` (Python documentation paragraphs) without the examples that fill the first
    ``holdout_sequences`` rows: those rows are exactly what ``data.holdout: {builtin: general}``
    evaluates in a fine-tuning run with the same ``seq_len`` / ``holdout_sequences``, so the
    forgetting measurement is on text the base model never saw. The next ``val_sequences`` rows'
    examples are a validation set (reported, never trained on).
  * the last ``domain_fraction`` of each domain's examples (file order), whole text trained on.
    Fine-tuning uses only the first examples of each domain (``finetune_max_examples`` in
    recipe.json, passed as ``data.domains.<name>.max_examples``), so pretraining never sees a
    fine-tuning row, training or eval.
- Model: ``transformers.Qwen3MoeForCausalLM`` (16 experts, top-2, 4 layers of width 128; about
  2.3 M parameters), random init from the seed.
- Training: one process, ``torch.set_num_threads(threads)``, plain ``torch.optim.AdamW``, linear
  warm-up then cosine decay, gradient clipping, the model's own load-balancing loss
  (``router_aux_loss_coef``; it keeps all experts in use so that domains can specialise them
  later; it is off in the saved config, so fine-tuning does not add it). Rows are drawn by a
  seeded permutation per epoch. Deterministic for a given torch build and thread count.
- Reported in recipe.json: every setting above, the hashes of the tokenizer and of the packed
  rows, the loss curve (every ``log_every`` steps: train, validation), and the final loss on the
  general holdout next to a unigram model's (token frequencies of the pretraining rows, add-one
  smoothing) on the same tokens.

``DSV2`` differs in:

- Model: ``transformers.DeepseekV2ForCausalLM`` with fine-grained experts: 4 layers of width 128,
  the first dense, then 64 routed experts (width 48, top-6) and 2 shared experts per layer, MLA
  attention without query compression (``q_lora_rank`` None, what DeepSpeed AutoEP's
  ``deepseek_v2`` preset takes), tied embeddings: routed experts hold ~82% of the 4.3 M
  parameters (``routed_expert_share`` in recipe.json). The same load-balancing loss as Qwen3-MoE's
  (``load_balancing_loss_func`` on the returned router logits; DeepseekV2 in transformers 5.22
  computes none itself), weighted by ``train.router_aux_loss_coef``.
- General text: the Python 3.11 documentation's reStructuredText sources (benchmarks/general_corpus.py,
  Debian's python3.11-doc: 2.67 M tokens trained on, 0.19 M held out), held out by whole document:
  the documents whose path hashes under ``holdout_fraction`` are never trained on (tokenizer
  included) and are written to ``general_holdout.jsonl`` in the model directory. Its first
  ``holdout_sequences`` packed rows are the general holdout (what ``data.holdout: {train: <model
  dir>/general_holdout.jsonl}`` evaluates; recipe.json's ``finetune.holdout``), the next
  ``val_sequences`` the validation set. The built-in ``general`` corpus (pydoc_data topics,
  generated from the same documentation) is not used: this model has seen most of its text.
- Training: 1000 steps of 32 rows of 128 tokens (4.1 M tokens, ~1.5 epochs), one thread (measured
  faster than two on the shared 2-core machine): ~10 min alone, ~16 min beside other jobs.

Every recipe's recipe.json also has ``finetune.max_eval_sequences``: per domain, the most
``data.eval_sequences`` desmoe can hold out of the fine-tuning examples at ``seq_len`` (a fifth of
their rows), and ``finetune.holdout``: the ``data.holdout`` mapping fine-tuning runs should use.

Cache: ``$DESMOE_CACHE/base_models/<key>`` (``DESMOE_CACHE`` defaults to ``.cache/desmoe`` in the
checkout, as for desmoe's sentencepiece models). The key hashes the recipe and the corpora's text,
so a change to either trains a new model. A model is written to a temporary folder beside it and
renamed into place when complete: a killed run leaves no half model.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import os
import shutil
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

FORMAT_VERSION = 1
"""Bumped when this file changes what a recipe produces (part of the cache key)."""

DOMAINS = ("math", "code", "intent", "summary", "law", "translation")
"""The six fine-tuning domains, in the order METHOD.md lists the paper's (domain-count runs take prefixes)."""

FULL = {
    "name": "full",
    "seed": 0,
    "threads": 1,
    "model": {"model_type": "qwen3_moe", "hidden_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4,
              "num_key_value_heads": 2, "head_dim": 32, "intermediate_size": 256, "num_experts": 16,
              "num_experts_per_tok": 2, "moe_intermediate_size": 64, "norm_topk_prob": True,
              "max_position_embeddings": 512, "router_aux_loss_coef": 0.01},
    "tokenizer": {"kind": "sentencepiece", "vocab_size": 2048, "corpora": [*DOMAINS, "general"]},
    "data": {"seq_len": 128, "holdout_sequences": 32, "val_sequences": 16, "domain_fraction": 0.1,
             "domains": list(DOMAINS)},
    "train": {"steps": 600, "batch_size": 16, "lr": 3e-3, "warmup_steps": 30, "min_lr_ratio": 0.1,
              "weight_decay": 0.1, "betas": [0.9, 0.95], "grad_clip": 1.0, "log_every": 50},
}

QUICK = copy.deepcopy(FULL)
QUICK["name"] = "quick"
QUICK["model"].update(hidden_size=64, num_hidden_layers=2, head_dim=16, intermediate_size=128, num_experts=8,
                      moe_intermediate_size=32)
QUICK["train"].update(steps=120, batch_size=8, warmup_steps=10, log_every=40)

DOCS = "python_docs"
"""Corpus name of the general corpus's training documents (benchmarks/general_corpus.py)."""
DOCS_HOLDOUT = "python_docs_holdout"
"""Corpus name of its held-out documents."""
HOLDOUT_FILE = "general_holdout.jsonl"
"""The held-out documents' examples in the model directory ({"text": ...} records)."""

DSV2 = {
    "name": "dsv2",
    "seed": 0,
    "threads": 1,
    "model": {"model_type": "deepseek_v2", "hidden_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4,
              "num_key_value_heads": 4, "intermediate_size": 384, "first_k_dense_replace": 1,
              "n_routed_experts": 64, "num_experts_per_tok": 6, "moe_intermediate_size": 48, "n_shared_experts": 2,
              "q_lora_rank": None, "kv_lora_rank": 32, "qk_nope_head_dim": 32, "qk_rope_head_dim": 16,
              "v_head_dim": 32, "n_group": 1, "topk_group": 1, "topk_method": "greedy",
              "tie_word_embeddings": True, "max_position_embeddings": 512},
    "tokenizer": {"kind": "sentencepiece", "vocab_size": 2048, "corpora": [*DOMAINS, DOCS]},
    "data": {"seq_len": 128, "holdout_sequences": 128, "val_sequences": 32, "domain_fraction": 0.1,
             "domains": list(DOMAINS), "general": {"corpus": DOCS, "holdout_fraction": 0.05, "max_chars": 2000}},
    "train": {"steps": 1000, "batch_size": 32, "lr": 3e-3, "warmup_steps": 50, "min_lr_ratio": 0.1,
              "weight_decay": 0.1, "betas": [0.9, 0.95], "grad_clip": 1.0, "log_every": 50,
              "router_aux_loss_coef": 0.01},
}

RECIPES = {"full": FULL, "quick": QUICK, "dsv2": DSV2}


def cache_root(cache_dir: str | None = None) -> str:
    """Where base models are kept: ``cache_dir``, else ``$DESMOE_CACHE/base_models`` (desmoe's cache)."""
    if cache_dir is not None:
        return os.path.abspath(cache_dir)
    from desmoe.data import spm_cache_dir

    return os.path.join(spm_cache_dir(), "base_models")


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _tensor_sha(t) -> str:
    return _sha(t.contiguous().numpy().tobytes())[:16]


def load_corpora(names) -> dict:
    """Built-in corpora as desmoe reads them: name -> list of examples (segments)."""
    from desmoe.config import DataSection, DomainSection
    from desmoe.data import load_domain_examples

    cfg = DataSection(domains={n: DomainSection(builtin=n) for n in names})
    examples, _ = load_domain_examples(cfg)
    return examples


def recipe_corpora(recipe: dict) -> list[str]:
    """Every built-in corpus the recipe reads (``general`` unless the recipe has its own general corpus)."""
    from desmoe.data.builtin import BUILTIN_DOMAINS

    names = set(recipe["tokenizer"]["corpora"]) | set(recipe["data"]["domains"])
    if "general" not in recipe["data"]:
        names.add("general")
    return sorted(n for n in names if n in BUILTIN_DOMAINS)


def load_recipe_corpora(recipe: dict, *, sources: str | None = None, log=None) -> tuple[dict, dict | None]:
    """(corpora, general): every corpus the recipe reads, name -> examples (segments), and where its
    own general corpus came from (None for a recipe on the built-in ``general``).

    A recipe with ``data.general`` adds the documentation corpus of benchmarks/general_corpus.py,
    split by whole document: DOCS (trained on) and DOCS_HOLDOUT (never). ``sources`` is its folder
    (default: general_corpus.find_sources' search, which may fetch the Debian package).
    """
    corpora = load_corpora(recipe_corpora(recipe))
    g = recipe["data"].get("general")
    if g is None:
        return corpora, None
    if g["corpus"] != DOCS:
        raise ValueError(f"data.general.corpus {g['corpus']!r}: only {DOCS!r} (benchmarks/general_corpus.py) exists")
    from benchmarks import general_corpus

    folder = general_corpus.find_sources(sources, log=log)
    split = general_corpus.load_general_corpus(folder, holdout_fraction=g["holdout_fraction"],
                                               max_chars=g["max_chars"])
    corpora[DOCS] = [[(t, True)] for t in split["train"]]
    corpora[DOCS_HOLDOUT] = [[(t, True)] for t in split["holdout"]]
    general = {"package": general_corpus.PACKAGE, "sources": folder, "licence": general_corpus.licence_file(folder),
               "train_documents": len(split["train_documents"]), "holdout_documents": split["holdout_documents"],
               "excluded_documents": list(general_corpus.EXCLUDED),
               "dropped_duplicate_paragraphs": split["dropped_duplicates"]}
    return corpora, general


def corpus_digest(corpora: dict) -> str:
    """A hash of the corpora's text (they are built from the installed Python, Debian and Babel)."""
    from desmoe.data import example_text

    h = hashlib.sha256()
    for name in sorted(corpora):
        h.update(name.encode() + b"\0")
        for ex in corpora[name]:
            h.update(example_text(ex).encode("utf-8", errors="replace") + b"\0")
    return h.hexdigest()[:16]


def recipe_key(recipe: dict, digest: str) -> str:
    """Cache key: the recipe (its name aside) and the corpora's digest."""
    body = {k: v for k, v in recipe.items() if k != "name"}
    text = json.dumps({"recipe": body, "corpora": digest, "format": FORMAT_VERSION}, sort_keys=True)
    return f"{recipe['name']}-{_sha(text.encode())[:16]}"


def build_sentencepiece(recipe: dict, corpora: dict) -> str:
    """The sentencepiece model of the recipe (desmoe's trainer and cache); returns its path."""
    from desmoe.config import DataSection
    from desmoe.data import train_sentencepiece

    tok = recipe["tokenizer"]
    if tok["kind"] != "sentencepiece":
        raise ValueError(f"tokenizer kind {tok['kind']!r}: only 'sentencepiece' is implemented")
    # NOTE: given the examples, desmoe's trainer reads only the vocabulary size from the config
    cfg = DataSection(domains={}, spm_vocab_size=tok["vocab_size"])
    return train_sentencepiece(cfg, {n: corpora[n] for n in tok["corpora"]})


def split_general(encoded: list, *, seq_len: int, holdout_rows: int, val_rows: int, bos: bool) -> tuple[int, int]:
    """(h, v): examples [0, h) fill the first ``holdout_rows`` packed rows (build_holdout's rows),
    [h, v) the next ``val_rows``; the rest is for training.

    ``encoded`` is a list of (ids, labels). With desmoe's 'split' packing an example occupies
    len(ids) + eos (+ bos) consecutive positions; an example that starts inside a row belongs to
    that row's set (so no text of the holdout leaks into training, even partly).
    """
    limits = (holdout_rows * seq_len, (holdout_rows + val_rows) * seq_len)
    cuts = []
    start = 0
    i = 0
    for limit in limits:
        while i < len(encoded) and start < limit:
            start += len(encoded[i][0]) + 1 + int(bos)
            i += 1
        cuts.append(i)
    if cuts[1] >= len(encoded):
        raise ValueError("the general corpus is too small for its holdout and validation rows")
    return cuts[0], cuts[1]


def load_holdout_rows(path: str, tokenizer, *, seq_len: int, rows: int) -> tuple:
    """The first ``rows`` rows (input_ids, labels: int64 [n, seq_len]) of a jsonl file as desmoe packs
    ``data.holdout: {train: path}`` (build_holdout itself), so they are what a fine-tuning run evaluates."""
    from desmoe.config import DataSection, DomainSection
    from desmoe.data import build_holdout

    cfg = DataSection(domains={}, holdout=DomainSection(train=path), seq_len=seq_len, holdout_sequences=rows)
    held = build_holdout(cfg, tokenizer)
    return held.eval_ids, held.eval_labels


def _general_builtin(d: dict, corpora: dict, tokenizer, pack) -> dict:
    """The built-in ``general`` corpus split by packed rows (split_general): holdout, val, train."""
    from desmoe.data import encode_example

    general = [encode_example(ex, tokenizer) for ex in corpora["general"]]
    h, v = split_general(general, seq_len=d["seq_len"], holdout_rows=d["holdout_sequences"],
                         val_rows=d["val_sequences"], bos=tokenizer.bos_id is not None)
    holdout_ids, holdout_labels = pack(general[:h])
    val_ids, val_labels = pack(general[h:v])
    train = pack(general[v:])
    return {"train": train, "val": (val_ids[:d["val_sequences"]], val_labels[:d["val_sequences"]]),
            "holdout": (holdout_ids[:d["holdout_sequences"]], holdout_labels[:d["holdout_sequences"]]),
            "source": {"examples": len(general) - v, "rows": int(train[0].shape[0]), "holdout_examples": h,
                       "val_examples": v - h}}


def _general_docs(d: dict, corpora: dict, tokenizer, pack, holdout_file: str) -> dict:
    """The documentation corpus: training documents packed; holdout and val rows from the held-out
    documents' file as desmoe reads it (the first ``holdout_sequences`` rows, then ``val_sequences``)."""
    from desmoe.data import encode_example

    encoded = [encode_example(ex, tokenizer) for ex in corpora[DOCS]]
    train = pack(encoded)
    h, v = d["holdout_sequences"], d["val_sequences"]
    ids, labels = load_holdout_rows(holdout_file, tokenizer, seq_len=d["seq_len"], rows=h + v)
    if ids.shape[0] < h + v:
        raise ValueError(f"the general corpus's held-out documents fill {ids.shape[0]} rows of {d['seq_len']} "
                         f"tokens, fewer than holdout_sequences + val_sequences = {h + v}. Raise "
                         "data.general.holdout_fraction or lower those counts.")
    held_tokens = sum(len(encode_example(ex, tokenizer)[0]) for ex in corpora[DOCS_HOLDOUT])
    return {"train": train, "holdout": (ids[:h], labels[:h]), "val": (ids[h:h + v], labels[h:h + v]),
            "source": {"examples": len(encoded), "rows": int(train[0].shape[0]),
                       "tokens": sum(len(e[0]) for e in encoded), "holdout_examples": len(corpora[DOCS_HOLDOUT]),
                       "holdout_tokens": held_tokens}}


def eval_capacity(encoded: list, *, seq_len: int, bos: bool) -> int:
    """The most ``data.eval_sequences`` desmoe holds out of these examples: a fifth of their packed rows
    (build_domain_data, data.long_examples 'split'); ``encoded`` is a list of (ids, labels)."""
    total = sum(len(ids) + 1 + int(bos) for ids, _ in encoded)
    return max(1, -(-total // seq_len) // 5)


def build_pretrain_data(recipe: dict, corpora: dict, tokenizer, *, holdout_file: str | None = None) -> dict:
    """The recipe's rows (int64 [N, seq_len] input_ids / labels): train, val and holdout, and what made them.

    ``holdout_file``: the held-out documents' jsonl (recipes with ``data.general`` only).
    """
    import torch

    from desmoe.data import encode_example, pack_sequences

    d = recipe["data"]
    seq_len = d["seq_len"]

    def pack(encoded):
        return pack_sequences(encoded, seq_len=seq_len, bos_id=tokenizer.bos_id, eos_id=tokenizer.eos_id,
                              pad_id=tokenizer.pad_id)

    if "general" in d:
        general = _general_docs(d, corpora, tokenizer, pack, holdout_file)
    else:
        general = _general_builtin(d, corpora, tokenizer, pack)
    parts = [general["train"]]
    sources = {d.get("general", {}).get("corpus", "general"): general["source"]}
    finetune_max, capacity = {}, {}
    for name in d["domains"]:
        exs = corpora[name]
        k = max(1, math.ceil(d["domain_fraction"] * len(exs)))
        finetune_max[name] = len(exs) - k
        capacity[name] = eval_capacity([encode_example(ex, tokenizer) for ex in exs[:len(exs) - k]], seq_len=seq_len,
                                       bos=tokenizer.bos_id is not None)
        # whole text trained on: pretraining is plain language modelling
        tail = [encode_example([(t, True) for t, _ in ex], tokenizer) for ex in exs[len(exs) - k:]]
        parts.append(pack(tail))
        sources[name] = {"examples": k, "rows": int(parts[-1][0].shape[0]), "of_examples": len(exs)}
    train_ids = torch.cat([p[0] for p in parts])
    train_labels = torch.cat([p[1] for p in parts])
    return {"train": (train_ids, train_labels), "val": general["val"], "holdout": general["holdout"],
            "sources": sources, "finetune_max_examples": finetune_max, "max_eval_sequences": capacity}


def compute_unigram_loss(train_labels, eval_labels, vocab_size: int) -> float:
    """Cross-entropy (nats/token) on ``eval_labels``' tokens of a unigram model with add-one smoothing,
    counted on ``train_labels``' tokens (IGNORE_INDEX skipped in both)."""
    import torch

    from desmoe.data import IGNORE_INDEX

    counts = torch.bincount(train_labels[train_labels != IGNORE_INDEX].flatten(), minlength=vocab_size).double() + 1
    logp = torch.log(counts / counts.sum())
    targets = eval_labels[eval_labels != IGNORE_INDEX]
    return float(-logp[targets].mean())


def compute_lm_loss(model, ids, labels, *, batch_size: int = 16) -> float:
    """Mean next-token cross-entropy over the labelled tokens, as desmoe's evaluate() computes it."""
    import torch

    from desmoe.data import IGNORE_INDEX

    total, count = 0.0, 0
    model.eval()
    with torch.no_grad():
        for s in range(0, ids.shape[0], batch_size):
            logits = model(input_ids=ids[s:s + batch_size]).logits.float()
            targets = labels[s:s + batch_size, 1:]
            total += float(torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                             targets.reshape(-1), ignore_index=IGNORE_INDEX,
                                                             reduction="sum"))
            count += int((targets != IGNORE_INDEX).sum())
    model.train()
    return total / max(count, 1)


def lr_at(step: int, t: dict) -> float:
    """Linear warm-up to ``lr`` over ``warmup_steps``, then cosine decay to ``min_lr_ratio`` x lr at ``steps``."""
    if step <= t["warmup_steps"]:
        return t["lr"] * step / max(1, t["warmup_steps"])
    frac = (step - t["warmup_steps"]) / max(1, t["steps"] - t["warmup_steps"])
    return t["lr"] * (t["min_lr_ratio"] + (1 - t["min_lr_ratio"]) * 0.5 * (1 + math.cos(math.pi * frac)))


def router_aux_coef(recipe: dict) -> float:
    """Weight of the load-balancing loss: the Qwen3-MoE config's own key, else the recipe's train key."""
    return recipe["model"].get("router_aux_loss_coef", recipe["train"].get("router_aux_loss_coef", 0.0))


def train_loss(model, out, coef: float):
    """(loss to backpropagate, LM loss, load-balancing loss) of a forward with ``output_router_logits``.

    Qwen3-MoE returns ``aux_loss`` and already adds ``coef`` x it to ``out.loss`` (its config's
    router_aux_loss_coef); DeepseekV2 in transformers 5.22 returns only the router logits, so the
    same Switch-style loss (Qwen3-MoE's load_balancing_loss_func) is computed here and added.
    """
    if getattr(out, "aux_loss", None) is not None:
        return out.loss, float(out.loss.detach()) - coef * float(out.aux_loss.detach()), float(out.aux_loss.detach())
    from transformers.models.qwen3_moe.modeling_qwen3_moe import load_balancing_loss_func

    from desmoe.models import num_routed_experts

    aux = load_balancing_loss_func(tuple(out.router_logits), num_routed_experts(model.config),
                                   model.config.num_experts_per_tok)
    return out.loss + coef * aux, float(out.loss.detach()), float(aux.detach())


def compute_routed_expert_share(model) -> dict:
    """Parameters of the model (tied ones once) and how many of them are routed experts' (``mlp.experts.``;
    shared experts, routers, attention and embeddings are not)."""
    import re

    total = sum(p.numel() for p in model.parameters())
    routed = sum(p.numel() for n, p in model.named_parameters() if re.search(r"(^|\.)mlp\.experts\.", n))
    return {"parameters": total, "routed_expert_parameters": routed, "routed_expert_share": routed / total}


def model_kwargs(recipe: dict, tokenizer) -> dict:
    """``model.tiny`` of the recipe for this tokenizer (vocabulary and special ids)."""
    return dict(recipe["model"], vocab_size=tokenizer.vocab_size, pad_token_id=tokenizer.pad_id,
                bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id)


def pretrain(recipe: dict, out_dir: str, *, corpora: dict | None = None, general: dict | None = None,
             final_dir: str | None = None, sources: str | None = None, log=print) -> dict:
    """Tokenizer, data, model and training of ``recipe``, saved into ``out_dir`` (which must exist).

    Writes config.json + model.safetensors (save_pretrained), tokenizer.model, recipe.json and,
    for a recipe with its own general corpus, general_holdout.jsonl; returns the recipe.json
    content. ``corpora`` and ``general`` (load_recipe_corpora's) save reading them again;
    ``final_dir`` is where ``out_dir`` will be renamed to (the paths recipe.json names).
    """
    import torch

    from desmoe.data import SentencePieceTokenizer, example_text
    from desmoe.models import build_tiny_model

    t0 = time.perf_counter()
    torch.set_num_threads(recipe["threads"])
    if corpora is None:
        corpora, general = load_recipe_corpora(recipe, sources=sources, log=log)
    digest = corpus_digest(corpora)
    spm_path = build_sentencepiece(recipe, corpora)
    tokenizer = SentencePieceTokenizer(spm_path)
    log(f"tokenizer: {spm_path}; {time.perf_counter() - t0:.1f}s")
    holdout_file = None
    if "general" in recipe["data"]:
        from benchmarks import general_corpus

        holdout_file = os.path.join(out_dir, HOLDOUT_FILE)
        general_corpus.save_jsonl([example_text(ex) for ex in corpora[DOCS_HOLDOUT]], holdout_file)
    data = build_pretrain_data(recipe, corpora, tokenizer, holdout_file=holdout_file)
    train_ids, train_labels = data["train"]
    log(f"pretrain data: {train_ids.shape[0]} rows of {recipe['data']['seq_len']} tokens "
        f"({int((train_labels != -100).sum())} trained tokens); val {data['val'][0].shape[0]} rows, "
        f"holdout {data['holdout'][0].shape[0]} rows; {time.perf_counter() - t0:.1f}s")

    model = build_tiny_model(model_kwargs(recipe, tokenizer), seed=recipe["seed"])
    share = compute_routed_expert_share(model)
    n_params = share["parameters"]
    coef = router_aux_coef(recipe)
    t = recipe["train"]
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": t["weight_decay"]},
                             {"params": no_decay, "weight_decay": 0.0}], lr=t["lr"], betas=tuple(t["betas"]))
    gen = torch.Generator().manual_seed(recipe["seed"])
    torch.manual_seed(recipe["seed"])
    n_rows, bs = train_ids.shape[0], t["batch_size"]
    order, pos, epoch = torch.randperm(n_rows, generator=gen), 0, 0
    curve = []
    window = []
    t_train = time.perf_counter()
    model.train()
    for step in range(1, t["steps"] + 1):
        if pos + bs > n_rows:
            order, pos, epoch = torch.randperm(n_rows, generator=gen), 0, epoch + 1
        idx = order[pos:pos + bs]
        pos += bs
        for g in opt.param_groups:
            g["lr"] = lr_at(step, t)
        out = model(input_ids=train_ids[idx], labels=train_labels[idx], output_router_logits=True)
        loss, lm_loss, aux_loss = train_loss(model, out, coef)
        loss.backward()
        if t["grad_clip"]:
            torch.nn.utils.clip_grad_norm_(model.parameters(), t["grad_clip"])
        opt.step()
        opt.zero_grad(set_to_none=True)
        window.append(lm_loss)
        if step % t["log_every"] == 0 or step == t["steps"]:
            val = compute_lm_loss(model, *data["val"])
            row = {"step": step, "train_loss": sum(window) / len(window), "val_loss": val,
                   "aux_loss": aux_loss, "lr": lr_at(step, t), "epoch": epoch,
                   "elapsed_s": time.perf_counter() - t_train}
            curve.append(row)
            window = []
            log(f"pretrain step {step}/{t['steps']} | train {row['train_loss']:.4f} | val {val:.4f} | "
                f"aux {row['aux_loss']:.3f} | epoch {epoch} | {row['elapsed_s']:.0f}s")
    train_time = time.perf_counter() - t_train

    holdout_loss = compute_lm_loss(model, *data["holdout"])
    unigram = compute_unigram_loss(train_labels, data["holdout"][1], tokenizer.vocab_size)
    model.config.output_router_logits = False
    model.save_pretrained(out_dir, safe_serialization=True)
    shutil.copyfile(spm_path, os.path.join(out_dir, "tokenizer.model"))
    with open(spm_path, "rb") as f:
        spm_hash = _sha(f.read())[:16]
    import transformers

    finetune = {"seq_len": recipe["data"]["seq_len"], "holdout_sequences": recipe["data"]["holdout_sequences"],
                "max_examples": data["finetune_max_examples"], "max_eval_sequences": data["max_eval_sequences"],
                "holdout": ({"train": os.path.join(os.path.abspath(final_dir or out_dir), HOLDOUT_FILE)}
                            if holdout_file else {"builtin": "general"})}
    info = {
        "recipe": recipe,
        "key": recipe_key(recipe, digest),
        "corpora_digest": digest,
        "tokenizer_sha256": spm_hash,
        "data": {"train_rows_sha256": _tensor_sha(train_ids), "train_labels_sha256": _tensor_sha(train_labels),
                 "val_rows_sha256": _tensor_sha(data["val"][0]), "holdout_rows_sha256": _tensor_sha(data["holdout"][0]),
                 "train_rows": int(n_rows), "trained_tokens": int((train_labels != -100).sum()),
                 "epochs": t["steps"] * bs / n_rows, "sources": data["sources"]},
        "finetune": finetune,
        "parameters": n_params,
        "routed_expert_parameters": share["routed_expert_parameters"],
        "routed_expert_share": share["routed_expert_share"],
        "vocab_size": tokenizer.vocab_size,
        "curve": curve,
        "final": {"holdout_loss": holdout_loss, "unigram_holdout_loss": unigram, "val_loss": curve[-1]["val_loss"],
                  "train_loss": curve[-1]["train_loss"]},
        "train_time_s": train_time,
        "total_time_s": time.perf_counter() - t0,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "threads": recipe["threads"]},
    }
    if general is not None:
        info["general_corpus"] = general
    with open(os.path.join(out_dir, "recipe.json"), "w", encoding="utf-8") as f:
        json.dump(info, f, indent=2)
    for name in os.listdir(out_dir):  # NOTE: safetensors writes its file private; the cache is shared
        os.chmod(os.path.join(out_dir, name), 0o644)
    log(f"pretrained {n_params / 1e6:.2f}M parameters ({share['routed_expert_share']:.1%} routed experts) in "
        f"{train_time:.0f}s: general holdout loss {holdout_loss:.4f} (unigram baseline {unigram:.4f})")
    return info


def base_model_dir(recipe: dict, cache_dir: str | None = None, *, corpora: dict | None = None,
                   sources: str | None = None) -> str:
    """The cache folder of ``recipe`` (reads the corpora to hash them, unless given; trains nothing)."""
    corpora = corpora if corpora is not None else load_recipe_corpora(recipe, sources=sources)[0]
    return os.path.join(cache_root(cache_dir), recipe_key(recipe, corpus_digest(corpora)))


def load_recipe_info(model_dir: str) -> dict:
    """recipe.json of a base model, with ``finetune.holdout`` always set and pointing into ``model_dir``.

    NOTE: models made before the key existed evaluate the built-in ``general``; a holdout file is
    re-rooted at ``model_dir``, so a moved cache folder still names its own file.
    """
    with open(os.path.join(model_dir, "recipe.json"), encoding="utf-8") as f:
        info = json.load(f)
    ft = info.setdefault("finetune", {})
    held = ft.setdefault("holdout", {"builtin": "general"})
    if "train" in held:
        ft["holdout"] = {"train": os.path.join(os.path.abspath(model_dir), os.path.basename(held["train"]))}
    return info


def ensure_base_model(recipe: dict = FULL, cache_dir: str | None = None, *, force: bool = False,
                      sources: str | None = None, log=print) -> tuple[str, bool]:
    """(model directory, trained now?): the cached model of ``recipe``, pretrained first if not cached.

    ``sources``: the documentation folder of a recipe with its own general corpus (default: found or
    fetched by benchmarks/general_corpus.py)."""
    corpora, general = load_recipe_corpora(recipe, sources=sources, log=log)
    final = base_model_dir(recipe, cache_dir, corpora=corpora)
    if os.path.isfile(os.path.join(final, "recipe.json")) and not force:
        log(f"base model (cached): {final}")
        link_latest(final, recipe["name"])
        return final, False
    os.makedirs(os.path.dirname(final), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=os.path.basename(final) + ".partial-", dir=os.path.dirname(final))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; the finished model is an ordinary folder
    try:
        pretrain(recipe, tmp, corpora=corpora, general=general, final_dir=final, log=log)
        if os.path.isdir(final):  # --force, or another process finished the same recipe first
            shutil.rmtree(final)
        os.rename(tmp, final)
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    log(f"base model: {final}")
    link_latest(final, recipe["name"])
    return final, True


def link_latest(model_dir: str, name: str) -> str:
    """``<cache>/<recipe name>`` -> ``model_dir`` (a relative symlink, replaced atomically): the stable path the
    shipped configs name (e.g. configs/demo_fft.yaml's model.path ``.cache/desmoe/base_models/full``)."""
    link = os.path.join(os.path.dirname(model_dir), name)
    tmp = f"{link}.link-{os.getpid()}"
    if os.path.lexists(tmp):
        os.remove(tmp)
    os.symlink(os.path.basename(model_dir), tmp)
    os.replace(tmp, link)
    return link


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.pretrain_base", description=__doc__.splitlines()[0])
    p.add_argument("--recipe", choices=sorted(RECIPES), default=None,
                   help="full (Qwen3-MoE, the default), quick (small and short, the smoke test's) or dsv2 "
                        "(DeepSeek-V2-shaped, on the Python documentation)")
    p.add_argument("--quick", action="store_true", help="the same as --recipe quick")
    p.add_argument("--cache", default=None, help="folder of cached base models (default $DESMOE_CACHE/base_models)")
    p.add_argument("--pydoc-sources", default=None,
                   help="folder of the Python documentation's .rst sources for dsv2 (default: $DESMOE_PYDOC_SOURCES, "
                        "the installed python3.11-doc, the cache, else fetched with apt-get download)")
    p.add_argument("--force", action="store_true", help="pretrain again even if cached")
    a = p.parse_args(argv)
    if a.quick and a.recipe not in (None, "quick"):
        p.error(f"--quick and --recipe {a.recipe} disagree; give one of them")
    name = "quick" if a.quick else (a.recipe or "full")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    try:
        path, _ = ensure_base_model(RECIPES[name], a.cache, force=a.force, sources=a.pydoc_sources, log=log)
    except FileNotFoundError as e:  # general_corpus.CorpusUnavailable, a missing built-in corpus's source
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
