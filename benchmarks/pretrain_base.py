"""Pretrain the small Qwen3-MoE base model that the experiments fine-tune, once, cached on disk.

    python -m benchmarks.pretrain_base [--quick] [--cache DIR] [--force]

Prints the model directory. ``ensure_base_model(recipe)`` is the same from Python.

The recipe (``FULL``; ``QUICK`` is smaller and shorter, for the smoke test):

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

RECIPES = {"full": FULL, "quick": QUICK}


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
    from desmoe.config import DataSection, DomainSection
    from desmoe.data import train_sentencepiece

    tok = recipe["tokenizer"]
    if tok["kind"] != "sentencepiece":
        raise ValueError(f"tokenizer kind {tok['kind']!r}: only 'sentencepiece' is implemented")
    cfg = DataSection(domains={n: DomainSection(builtin=n) for n in tok["corpora"]}, spm_vocab_size=tok["vocab_size"])
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


def build_pretrain_data(recipe: dict, corpora: dict, tokenizer) -> dict:
    """The recipe's rows (int64 [N, seq_len] input_ids / labels): train, val and holdout, and what made them."""
    import torch

    from desmoe.data import encode_example, pack_sequences

    d = recipe["data"]
    seq_len = d["seq_len"]

    def pack(encoded):
        return pack_sequences(encoded, seq_len=seq_len, bos_id=tokenizer.bos_id, eos_id=tokenizer.eos_id,
                              pad_id=tokenizer.pad_id)

    general = [encode_example(ex, tokenizer) for ex in corpora["general"]]
    h, v = split_general(general, seq_len=seq_len, holdout_rows=d["holdout_sequences"], val_rows=d["val_sequences"],
                         bos=tokenizer.bos_id is not None)
    holdout_ids, holdout_labels = pack(general[:h])
    val_ids, val_labels = pack(general[h:v])
    parts = [pack(general[v:])]
    sources = {"general": {"examples": len(general) - v, "rows": int(parts[0][0].shape[0]),
                           "holdout_examples": h, "val_examples": v - h}}
    finetune_max = {}
    for name in d["domains"]:
        exs = corpora[name]
        k = max(1, math.ceil(d["domain_fraction"] * len(exs)))
        finetune_max[name] = len(exs) - k
        # whole text trained on: pretraining is plain language modelling
        tail = [encode_example([(t, True) for t, _ in ex], tokenizer) for ex in exs[len(exs) - k:]]
        parts.append(pack(tail))
        sources[name] = {"examples": k, "rows": int(parts[-1][0].shape[0]), "of_examples": len(exs)}
    train_ids = torch.cat([p[0] for p in parts])
    train_labels = torch.cat([p[1] for p in parts])
    return {"train": (train_ids, train_labels), "val": (val_ids[:d["val_sequences"]], val_labels[:d["val_sequences"]]),
            "holdout": (holdout_ids[:d["holdout_sequences"]], holdout_labels[:d["holdout_sequences"]]),
            "sources": sources, "finetune_max_examples": finetune_max}


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


def recipe_corpora(recipe: dict) -> list[str]:
    """Every built-in corpus the recipe reads."""
    return sorted(set(recipe["tokenizer"]["corpora"]) | set(recipe["data"]["domains"]) | {"general"})


def pretrain(recipe: dict, out_dir: str, *, corpora: dict | None = None, log=print) -> dict:
    """Tokenizer, data, model and training of ``recipe``, saved into ``out_dir`` (which must exist).

    Writes config.json + model.safetensors (save_pretrained), tokenizer.model and recipe.json;
    returns the recipe.json content. ``corpora`` (load_corpora's) saves reading them again.
    """
    import torch

    from desmoe.data import SentencePieceTokenizer
    from desmoe.models import build_tiny_model

    t0 = time.perf_counter()
    torch.set_num_threads(recipe["threads"])
    if corpora is None:
        corpora = load_corpora(recipe_corpora(recipe))
    digest = corpus_digest(corpora)
    spm_path = build_sentencepiece(recipe, corpora)
    tokenizer = SentencePieceTokenizer(spm_path)
    data = build_pretrain_data(recipe, corpora, tokenizer)
    train_ids, train_labels = data["train"]
    log(f"pretrain data: {train_ids.shape[0]} rows of {recipe['data']['seq_len']} tokens "
        f"({int((train_labels != -100).sum())} trained tokens); val {data['val'][0].shape[0]} rows, "
        f"holdout {data['holdout'][0].shape[0]} rows; {time.perf_counter() - t0:.1f}s")

    mcfg = dict(recipe["model"], vocab_size=tokenizer.vocab_size, pad_token_id=tokenizer.pad_id,
                bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id)
    model = build_tiny_model(mcfg, seed=recipe["seed"])
    n_params = sum(p.numel() for p in model.parameters())
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
        # out.loss already includes router_aux_loss_coef x aux_loss when router logits are returned
        out.loss.backward()
        if t["grad_clip"]:
            torch.nn.utils.clip_grad_norm_(model.parameters(), t["grad_clip"])
        opt.step()
        opt.zero_grad(set_to_none=True)
        lm_loss = float(out.loss.detach()) - recipe["model"]["router_aux_loss_coef"] * float(out.aux_loss.detach())
        window.append(lm_loss)
        if step % t["log_every"] == 0 or step == t["steps"]:
            val = compute_lm_loss(model, *data["val"])
            row = {"step": step, "train_loss": sum(window) / len(window), "val_loss": val,
                   "aux_loss": float(out.aux_loss.detach()), "lr": lr_at(step, t), "epoch": epoch,
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

    info = {
        "recipe": recipe,
        "key": recipe_key(recipe, digest),
        "corpora_digest": digest,
        "tokenizer_sha256": spm_hash,
        "data": {"train_rows_sha256": _tensor_sha(train_ids), "train_labels_sha256": _tensor_sha(train_labels),
                 "val_rows_sha256": _tensor_sha(data["val"][0]), "holdout_rows_sha256": _tensor_sha(data["holdout"][0]),
                 "train_rows": int(n_rows), "trained_tokens": int((train_labels != -100).sum()),
                 "epochs": t["steps"] * bs / n_rows, "sources": data["sources"]},
        "finetune": {"seq_len": recipe["data"]["seq_len"], "holdout_sequences": recipe["data"]["holdout_sequences"],
                     "max_examples": data["finetune_max_examples"]},
        "parameters": n_params,
        "vocab_size": tokenizer.vocab_size,
        "curve": curve,
        "final": {"holdout_loss": holdout_loss, "unigram_holdout_loss": unigram, "val_loss": curve[-1]["val_loss"],
                  "train_loss": curve[-1]["train_loss"]},
        "train_time_s": train_time,
        "total_time_s": time.perf_counter() - t0,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "threads": recipe["threads"]},
    }
    with open(os.path.join(out_dir, "recipe.json"), "w", encoding="utf-8") as f:
        json.dump(info, f, indent=2)
    log(f"pretrained {n_params / 1e6:.2f}M parameters in {train_time:.0f}s: general holdout loss {holdout_loss:.4f} "
        f"(unigram baseline {unigram:.4f})")
    return info


def base_model_dir(recipe: dict, cache_dir: str | None = None, *, corpora: dict | None = None) -> str:
    """The cache folder of ``recipe`` (reads the corpora to hash them, unless given; trains nothing)."""
    corpora = corpora if corpora is not None else load_corpora(recipe_corpora(recipe))
    return os.path.join(cache_root(cache_dir), recipe_key(recipe, corpus_digest(corpora)))


def load_recipe_info(model_dir: str) -> dict:
    with open(os.path.join(model_dir, "recipe.json"), encoding="utf-8") as f:
        return json.load(f)


def ensure_base_model(recipe: dict = FULL, cache_dir: str | None = None, *, force: bool = False,
                      log=print) -> tuple[str, bool]:
    """(model directory, trained now?): the cached model of ``recipe``, pretrained first if not cached."""
    corpora = load_corpora(recipe_corpora(recipe))
    final = base_model_dir(recipe, cache_dir, corpora=corpora)
    if os.path.isfile(os.path.join(final, "recipe.json")) and not force:
        log(f"base model (cached): {final}")
        return final, False
    os.makedirs(os.path.dirname(final), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=os.path.basename(final) + ".partial-", dir=os.path.dirname(final))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; the finished model is an ordinary folder
    try:
        pretrain(recipe, tmp, corpora=corpora, log=log)
        if os.path.isdir(final):  # --force, or another process finished the same recipe first
            shutil.rmtree(final)
        os.rename(tmp, final)
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    log(f"base model: {final}")
    return final, True


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.pretrain_base", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="the small, short recipe of the smoke test")
    p.add_argument("--cache", default=None, help="folder of cached base models (default $DESMOE_CACHE/base_models)")
    p.add_argument("--force", action="store_true", help="pretrain again even if cached")
    a = p.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    path, _ = ensure_base_model(QUICK if a.quick else FULL, a.cache, force=a.force,
                                log=lambda m: print(m, file=sys.stderr, flush=True))
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
