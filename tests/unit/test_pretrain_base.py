"""benchmarks/general_corpus.py and the dsv2 recipe of benchmarks/pretrain_base.py: the pure parts.

Nothing here pretrains or needs the real documentation: the corpus reader runs on a small fake
``_sources`` folder, the model is built on the meta device.
"""

import copy
import json
import os

import pytest
import torch

from benchmarks import general_corpus as gc
from benchmarks import pretrain_base as pb
from desmoe.config import DataSection, DomainSection, config_from_dict, validate
from desmoe.data import ByteTokenizer, build_domain_data, build_holdout, encode_example

RST = """\
.. _{name}-label:

:mod:`{name}` --- The {name} module
===================================

.. module:: {name}
   :synopsis: Does {name} things.

.. moduleauthor:: Someone <someone@example.org>

.. index::
   single: {name}; module

The :mod:`{name}` module provides :func:`~{name}.run` and ``{name}.stop``.
See `the site <https://example.org>`_ for more.

.. function:: run(x, y=1)

   Run *x* with the :class:`{name}.Config` of {name}.

   .. versionadded:: 3.4

Example::

   >>> run(1)
   2

.. toctree::
   :maxdepth: 2

   other

A last paragraph about {name}, long enough to be worth reading on its own, with a tail.
"""


def _fake_sources(root, names, extra=None):
    """A ``_sources`` folder of one rst document per name (under library/), plus ``extra`` {rel: text}."""
    for name in names:
        path = root / "library" / f"{name}.rst.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(RST.format(name=name))
    for rel, text in (extra or {}).items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return str(root)


def test_clean_rst_keeps_the_text_and_drops_the_markup():
    paras = gc.split_paragraphs(gc.clean_rst(RST.format(name="spam")))
    assert paras == [
        "spam --- The spam module",
        "The spam module provides run and spam.stop.\nSee the site for more.",
        "run(x, y=1)",
        "Run *x* with the spam.Config of spam.",
        "New in version 3.4.",
        "Example:",
        ">>> run(1)\n2",
        "A last paragraph about spam, long enough to be worth reading on its own, with a tail.",
    ]


def test_paragraphs_merge_up_to_the_bound_and_long_ones_are_cut():
    paras = ["a" * 30, "b" * 30, "c" * 30, "word " * 40]
    merged = gc.merge_paragraphs(paras, max_chars=70)
    assert merged[0] == "a" * 30 + "\n\n" + "b" * 30  # 62 chars; adding c would pass 70
    assert all(len(m) <= 70 for m in merged)
    assert gc.normalise(" ".join(merged)) == gc.normalise(" ".join(paras))  # nothing lost


def test_documents_are_read_in_sorted_order_and_deterministically(tmp_path):
    root = _fake_sources(tmp_path / "_sources", ["zeta", "alpha", "mid"],
                         extra={"license.rst.txt": "The licence text.\n", "notes.txt": "not a source\n"})
    assert gc.list_documents(root) == ["library/alpha.rst.txt", "library/mid.rst.txt", "library/zeta.rst.txt",
                                       "license.rst.txt"]
    docs = gc.load_documents(root)
    assert list(docs) == ["library/alpha", "library/mid", "library/zeta"]  # license: the law domain's text
    assert docs == gc.load_documents(root)


def test_holdout_is_by_whole_document_and_shares_no_paragraph_with_training(tmp_path):
    names = [f"mod{i:02d}" for i in range(16)]
    held_name = next(n for n in names if gc.is_holdout(f"library/{n}", 0.3))
    train_name = next(n for n in names if not gc.is_holdout(f"library/{n}", 0.3))
    dup = "A paragraph repeated verbatim on two pages of the documentation, long enough to count as text."
    inner = "A passage that a held-out page quotes inside a longer paragraph of its own, long enough to count."
    root = _fake_sources(tmp_path / "_sources", names)

    def append(name, *paras):
        with open(os.path.join(root, "library", f"{name}.rst.txt"), "a") as f:
            f.write("".join("\n" + p + "\n" for p in paras))

    append(held_name, dup, f"Before it. {inner} After it.", "Changed in version 9.9.")
    # the first three repeat held-out text (equal, around a held-out paragraph, inside one); the last is short
    append(train_name, dup, f"Quoting: A last paragraph about {held_name}, long enough to be worth reading on its "
                            "own, with a tail. End.", inner, "Changed in version 9.9.")
    split = gc.load_general_corpus(root, holdout_fraction=0.3, max_chars=300)
    held = set(split["holdout_documents"])
    assert held and len(held) < len(names) and f"library/{held_name}" in held
    assert set(split["train_documents"]) == {f"library/{n}" for n in names} - held
    train_text = "\n".join(split["train"])
    holdout_text = "\n".join(split["holdout"])
    for n in names:  # every document's own sentence is on exactly one side
        own = f"A last paragraph about {n},"
        assert (own in holdout_text) == (f"library/{n}" in held) and (own in train_text) != (f"library/{n}" in held)
    for passage in (dup, inner):
        assert passage in holdout_text and passage not in train_text
    assert split["dropped_duplicates"] == 3 and "Changed in version 9.9." in train_text  # stock phrases stay
    assert all(len(t) <= 300 for t in split["train"] + split["holdout"])
    again = gc.load_general_corpus(root, holdout_fraction=0.3, max_chars=300)
    assert again["train"] == split["train"] and again["holdout"] == split["holdout"]


def test_find_sources_order_and_errors(tmp_path, monkeypatch):
    monkeypatch.setattr(gc, "INSTALLED", str(tmp_path / "not-installed"))
    monkeypatch.delenv(gc.ENV_VAR, raising=False)
    given = _fake_sources(tmp_path / "given", ["a"])
    env = _fake_sources(tmp_path / "env", ["b"])
    cache = tmp_path / "cache"
    assert gc.find_sources(given, cache_dir=str(cache), fetch=False) == given
    monkeypatch.setenv(gc.ENV_VAR, env)
    assert gc.find_sources(cache_dir=str(cache), fetch=False) == env
    assert gc.find_sources(given, cache_dir=str(cache), fetch=False) == given  # the argument beats the variable
    monkeypatch.setenv(gc.ENV_VAR, str(tmp_path / "empty"))
    with pytest.raises(gc.CorpusUnavailable, match=r"\$DESMOE_PYDOC_SOURCES .* holds no Python documentation"):
        gc.find_sources(cache_dir=str(cache), fetch=False)
    monkeypatch.delenv(gc.ENV_VAR)
    with pytest.raises(gc.CorpusUnavailable, match=r"apt-get install python3\.11-doc.*DESMOE_PYDOC_SOURCES"):
        gc.find_sources(cache_dir=str(cache), fetch=False)
    cached = _fake_sources(cache / "python3.11-doc_3.11.2-6" / "_sources", ["c"])
    assert gc.find_sources(cache_dir=str(cache), fetch=False) == cached


def test_fetch_extracts_only_the_sources_and_the_licence(tmp_path, monkeypatch):
    """apt-get and dpkg-deb stood in for: what lands in the cache, and nothing else."""
    calls = []

    def fake_run(cmd, *, cwd):
        calls.append(cmd[:2])
        if cmd[:2] == ["apt-get", "download"]:
            (tmp_path.joinpath(cwd) / "python3.11-doc_3.11.2-6+deb12u8_all.deb").write_bytes(b"deb")
        else:  # dpkg-deb -x DEB ROOT
            root = tmp_path.joinpath(cmd[3])
            _fake_sources(root / gc.INSTALLED.lstrip("/"), ["a"])
            _fake_sources(root, [], extra={"usr/share/doc/python3.11/html/x.html": "",
                                           "usr/share/doc/python3.11-doc/copyright": "PSF License"})

    monkeypatch.setattr(gc, "_run", fake_run)
    monkeypatch.setattr(gc, "INSTALLED", "/usr/share/doc/python3.11/html/_sources")
    cache = tmp_path / "cache"
    got = gc.fetch_sources(str(cache))
    assert calls == [["apt-get", "download"], ["dpkg-deb", "-x"]]
    final = cache / "python3.11-doc_3.11.2-6+deb12u8"
    assert got == str(final / "_sources") and sorted(os.listdir(final)) == ["_sources", "copyright"]
    assert os.listdir(cache) == [final.name]  # the download folder is gone
    assert gc.cached_sources(str(cache)) == got and gc.licence_file(got) == str(final / "copyright")


def _dsv2_model(recipe=pb.DSV2, vocab_size=2048):
    import transformers

    from desmoe.models import tiny_config_kwargs

    family, kwargs = tiny_config_kwargs(dict(recipe["model"], vocab_size=vocab_size))
    config = getattr(transformers, family.config_class)(**kwargs)
    with torch.device("meta"):
        return transformers.AutoModelForCausalLM.from_config(config), family


def test_dsv2_model_is_fine_grained_and_mostly_routed_experts():
    from desmoe.models import moe_layer_indices, num_routed_experts

    model, family = _dsv2_model(vocab_size=pb.DSV2["tokenizer"]["vocab_size"])
    cfg = model.config
    assert family.autoep_preset == "deepseek_v2" and cfg.model_type == "deepseek_v2"
    assert cfg.q_lora_rank is None and cfg.n_group == 1 and cfg.topk_group == 1 and cfg.topk_method == "greedy"
    assert num_routed_experts(cfg) == 64 and cfg.num_experts_per_tok == 6 and cfg.n_shared_experts == 2
    assert moe_layer_indices(cfg) == [1, 2, 3]  # the first layer dense
    share = pb.compute_routed_expert_share(model)
    assert share["routed_expert_share"] >= 0.8
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied: counted once
    qwen, _ = _dsv2_model(pb.FULL)
    assert pb.compute_routed_expert_share(qwen)["routed_expert_share"] < share["routed_expert_share"]


def test_recipes_finetune_settings_and_unchanged_keys():
    assert set(pb.RECIPES) == {"full", "quick", "dsv2"}
    d = pb.DSV2["data"]
    assert d["holdout_sequences"] >= 128 and d["val_sequences"] >= 16 and d["domains"] == list(pb.DOMAINS)
    assert d["general"]["corpus"] == pb.DOCS and pb.DOCS in pb.DSV2["tokenizer"]["corpora"]
    assert "general" not in pb.recipe_corpora(pb.DSV2) and "general" in pb.recipe_corpora(pb.FULL)
    assert pb.router_aux_coef(pb.DSV2) > 0 and pb.router_aux_coef(pb.FULL) == 0.01
    # adding dsv2 left the other recipes' cache keys as they were
    assert pb.recipe_key(pb.FULL, "abc") == "full-1dfe540a11251428"
    assert pb.recipe_key(pb.QUICK, "abc") == "quick-d2cf60af4038ae8d"


def _texts(prefix, n):
    return [[(f"{prefix} {i}: " + "some words of text " * 3, True)] for i in range(n)]


def test_dsv2_data_holds_out_exactly_the_rows_desmoe_evaluates(tmp_path):
    tok = ByteTokenizer()
    recipe = copy.deepcopy(pb.DSV2)
    recipe["data"].update(seq_len=64, holdout_sequences=6, val_sequences=3, domains=["math"])
    corpora = {pb.DOCS: _texts("TRAIN", 40), pb.DOCS_HOLDOUT: _texts("HELD", 20),
               "math": [[(f"Question: What is {i} + 1?\nAnswer:", True), (f" {i + 1}", True)] for i in range(300)]}
    path = str(tmp_path / pb.HOLDOUT_FILE)
    gc.save_jsonl([t for [(t, _)] in corpora[pb.DOCS_HOLDOUT]], path)
    data = pb.build_pretrain_data(recipe, corpora, tok, holdout_file=path)

    # the holdout rows are build_holdout's for data.holdout: {train: <the file>}
    cfg = DataSection(domains={}, holdout=DomainSection(train=path), seq_len=64, holdout_sequences=6)
    desmoe_rows = build_holdout(cfg, tok)
    assert torch.equal(data["holdout"][0], desmoe_rows.eval_ids)
    assert data["val"][0].shape == (3, 64) and not torch.equal(data["val"][0][:1], data["holdout"][0][:1])
    train_text = "".join(tok.decode(r.tolist()) for r in data["train"][0])
    assert "HELD" not in train_text and "TRAIN 39" in train_text
    assert data["finetune_max_examples"] == {"math": 270}
    assert data["sources"][pb.DOCS]["holdout_examples"] == 20

    # and a desmoe run config reads the file as its holdout
    run = config_from_dict({"model": {"tiny": {"model_type": "deepseek_v2"}}, "train": {"max_steps": 1},
                            "data": {"domains": {"math": {"builtin": "math"}}, "holdout": {"train": path}}})
    validate(run, world_size=1)
    assert run.data.holdout.train == path


def test_eval_capacity_is_what_desmoe_holds_out_at_most():
    tok = ByteTokenizer()
    for name, n in (("math", 200), ("law", 40)):
        cfg = DataSection(domains={name: DomainSection(builtin=name, max_examples=n)}, seq_len=64,
                          eval_sequences=10 ** 6)
        domains, _ = build_domain_data(cfg, tok)
        exs = pb.load_corpora([name])[name][:n]
        cap = pb.eval_capacity([encode_example(ex, tok) for ex in exs], seq_len=64, bos=True)
        assert domains[name].eval_ids.shape[0] == cap


def test_recipe_info_always_names_a_holdout_inside_its_model_dir(tmp_path):
    old = tmp_path / "old"
    old.mkdir()
    (old / "recipe.json").write_text(json.dumps({"finetune": {"seq_len": 128}}))
    assert pb.load_recipe_info(str(old))["finetune"]["holdout"] == {"builtin": "general"}
    moved = tmp_path / "moved"
    moved.mkdir()
    (moved / "recipe.json").write_text(json.dumps(
        {"finetune": {"holdout": {"train": "/somewhere/else/general_holdout.jsonl"}}}))
    assert pb.load_recipe_info(str(moved))["finetune"]["holdout"] == {"train": str(moved / "general_holdout.jsonl")}


def test_load_balancing_loss_is_added_for_deepseek_v2():
    from desmoe.models import build_tiny_model

    tiny = dict(model_type="deepseek_v2", vocab_size=64, hidden_size=32, num_hidden_layers=2, n_routed_experts=8,
                num_experts_per_tok=2, moe_intermediate_size=16)
    model = build_tiny_model(tiny, seed=0)
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    out = model(input_ids=ids, labels=ids, output_router_logits=True)
    loss, lm, aux = pb.train_loss(model, out, 0.1)
    assert lm == pytest.approx(float(out.loss.detach())) and aux > 0
    assert float(loss.detach()) == pytest.approx(lm + 0.1 * aux)
    assert 1.0 <= aux <= 8 * 2  # top_k when balanced, num_experts x top_k at most


def test_cli_rejects_quick_with_another_recipe(capsys):
    with pytest.raises(SystemExit):
        pb.main(["--quick", "--recipe", "dsv2"])
    assert "disagree" in capsys.readouterr().err
