"""desmoe export on checkpoints laid out as DeepSpeed 0.19.8 writes them (no process group).

The checkpoints are made by DeepSpeed AutoEP's own conversion of a stock HF model (one
replacement per EP rank, offline), written in the layout engine.save_checkpoint uses:
``mp_rank_00_model_states.pt`` (non-expert state + ds_autoep_layers) and one
``layer_<moe>_expert_<g>_mp_rank_00_model_states.pt`` per global expert. The real 2-rank
save is tests/integration/test_export.py.
"""

import copy
import json
import os

import pytest
import torch
import yaml

from desmoe import dist
from desmoe.models import FAMILIES, build_tiny_model, moe_layer_indices

dist.setup_env()

from desmoe.cli import main as cli_main  # noqa: E402
from desmoe.export import ALR_FILE, EXPORT_META, SPM_FILE, ExportError, export_run, load_pretrained  # noqa: E402
from desmoe.routing.alr import AdaptiveRouter  # noqa: E402

SEED = 1234
TAG = "step7"


def make_run(tmp_path, model_type="qwen3_moe", *, ep_size=2, mode="fft", tiny=None, data=None, model_path=False,
             name="run", dtype=torch.float32):
    """A run directory with a fake-but-faithful checkpoint; returns (run_dir, reference HF model).

    The reference holds the weights the checkpoint holds (random, not the seed's initialisation,
    so an export that kept the skeleton's weights would fail) and, in ALR modes, adaptive routers.
    """
    from deepspeed.module_inject.auto_ep import AutoEP
    from deepspeed.module_inject.auto_ep_config import parse_autoep_config
    from deepspeed.module_inject.auto_ep_layer import AutoEPMoELayer

    run_dir = tmp_path / name
    ckpt = run_dir / "checkpoints" / TAG
    ckpt.mkdir(parents=True)
    tiny = {"model_type": model_type, **(tiny or {})}
    model = build_tiny_model(tiny, seed=SEED)
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for t in list(model.parameters()) + [b for n, b in model.named_buffers() if "e_score_correction_bias" in n]:
            t.add_(0.05 * torch.randn(t.shape, generator=gen))
    if mode in ("desmoe", "desmoe_no_dges"):
        for i in moe_layer_indices(model.config):
            layer = model.model.layers[i]
            layer.adaptive_router = AdaptiveRouter(router_weight=layer.mlp.gate.weight, hidden=24, seed=i)
            with torch.no_grad():
                for p in layer.adaptive_router.parameters():
                    p.add_(0.1 * torch.randn(p.shape, generator=gen))
    model.to(dtype)  # bf16 runs save bf16 module weights
    cfg = {"run": {"name": "t", "output_dir": str(run_dir), "seed": SEED},
           "model": {"tiny": tiny},
           "parallel": {"ep_size": ep_size},
           "train": {"max_steps": 7, "micro_batch_size": 2},
           "data": {"seq_len": 32, "domains": {"math": {"builtin": "math"}}, **(data or {})},
           "method": {"mode": mode}}
    if model_path:
        path = tmp_path / f"{name}_base_model"
        build_tiny_model(tiny, seed=0).save_pretrained(path)
        cfg["model"] = {"path": str(path)}
    (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg))
    fam = FAMILIES[model_type]
    section = dict(fam.autoep_section(model.config), enabled=True, autoep_size=ep_size)
    (run_dir / "ds_config.json").write_text(json.dumps({"expert_parallel": section}))

    for ep_rank in range(ep_size):
        replaced = copy.deepcopy(model)
        autoep = AutoEP(replaced, parse_autoep_config(section))
        autoep.replace_moe_layers(autoep.ep_parser(), ep_size=ep_size, ep_rank=ep_rank)
        layers = [(n, m) for n, m in replaced.named_modules() if isinstance(m, AutoEPMoELayer)]
        for moe_id, (path, layer) in enumerate(layers):
            for local in range(layer.num_local_experts):
                g = ep_rank * layer.num_local_experts + local
                shard = {f"{path}.experts.{w}.{g}": getattr(layer.experts, w)[local].clone() for w in ("w1", "w2", "w3")}
                torch.save(shard, ckpt / f"layer_{moe_id}_expert_{g}_mp_rank_00_model_states.pt")
        if ep_rank == 0:
            expert_keys = {f"{path}.experts.{w}" for path, _ in layers for w in ("w1", "w2", "w3")}
            module = {k: v for k, v in replaced.state_dict().items() if k not in expert_keys}
            meta = [{"moe_layer_id": j, "module_path": path, "num_experts": layer.num_experts,
                     "expert_key_prefix": f"{path}.experts", "checkpoint_format": "per_expert_files"}
                    for j, (path, layer) in enumerate(layers)]
            torch.save({"module": module, "ds_autoep_layers": meta, "ds_config": {"expert_parallel": section},
                        "global_steps": 7}, ckpt / "mp_rank_00_model_states.pt")
    (run_dir / "checkpoints" / "latest").write_text(TAG)
    return str(run_dir), model


def hf_state(model):
    return {k: v for k, v in model.state_dict().items() if ".adaptive_router." not in k}


def load_plain(out):
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    assert not info["error_msgs"], info
    return model


IDS = torch.tensor([[1, 17, 200, 33, 5, 48, 99, 2], [1, 300, 4, 4, 81, 7, 150, 2]])


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_every_family_round_trips_through_autoep_and_loads_strictly(tmp_path, model_type):
    run_dir, ref = make_run(tmp_path, model_type, ep_size=2)
    out = str(tmp_path / "export")
    meta = export_run(run_dir, out)
    assert meta["checkpoint"] == TAG and meta["model_type"] == model_type and meta["adaptive_routers"] is None
    model = load_plain(out)
    want, got = hf_state(ref), model.state_dict()
    assert want.keys() == got.keys()
    for k in want:
        assert torch.equal(want[k], got[k]), k
    with torch.no_grad():
        assert torch.equal(model(input_ids=IDS).logits, ref.eval()(input_ids=IDS).logits)
    assert sorted(os.listdir(out)) == ["config.json", EXPORT_META, "generation_config.json", "model.safetensors",
                                       "tokenizer.json", "tokenizer_config.json"]


def test_ep_size_1_tied_embeddings_and_model_path(tmp_path):
    run_dir, ref = make_run(tmp_path, "qwen3_moe", ep_size=1, tiny={"tie_word_embeddings": True})
    export_run(run_dir, str(tmp_path / "a"))
    with torch.no_grad():
        assert torch.equal(load_plain(str(tmp_path / "a"))(input_ids=IDS).logits, ref.eval()(input_ids=IDS).logits)

    # model.path: the skeleton comes from the model directory's config.json (built on the meta device)
    run_dir, ref = make_run(tmp_path, "mixtral", model_path=True, name="run_path")
    export_run(run_dir, str(tmp_path / "b"))
    with torch.no_grad():
        assert torch.equal(load_plain(str(tmp_path / "b"))(input_ids=IDS).logits, ref.eval()(input_ids=IDS).logits)


def test_bf16_checkpoint_exports_bf16_weights_and_routers(tmp_path):
    run_dir, ref = make_run(tmp_path, "qwen2_moe", mode="desmoe", dtype=torch.bfloat16)
    out = str(tmp_path / "export")
    assert export_run(run_dir, out)["dtype"] == "bfloat16"
    assert json.loads(open(os.path.join(out, "config.json")).read())["dtype"] == "bfloat16"
    plain = load_plain(out)
    assert plain.dtype == torch.bfloat16
    for k, v in hf_state(ref).items():
        assert torch.equal(plain.state_dict()[k], v), k
    model = load_pretrained(out)
    assert model.model.layers[0].adaptive_router.w1.dtype == torch.bfloat16
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=IDS).logits).all()
    os.remove(os.path.join(out, ALR_FILE))
    with pytest.raises(ExportError, match="adaptive_routers.safetensors is missing"):
        load_pretrained(out)


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_adaptive_routers_are_saved_beside_the_model_and_reattached(tmp_path, model_type):
    run_dir, ref = make_run(tmp_path, model_type, mode="desmoe")
    out = str(tmp_path / "export")
    meta = export_run(run_dir, out)
    layers = moe_layer_indices(ref.config)
    alr = meta["adaptive_routers"]
    assert alr["layers"] == layers and alr["router_hidden"] == 24 and alr["file"] == ALR_FILE
    from safetensors import safe_open

    with safe_open(os.path.join(out, "model.safetensors"), "pt") as f:
        assert not [k for k in f.keys() if "adaptive" in k]
    plain = load_plain(out)  # the stock model: fine-tuned router weights, no residual
    assert torch.equal(plain.model.layers[layers[0]].mlp.gate.weight, ref.model.layers[layers[0]].mlp.gate.weight)

    model = load_pretrained(out)
    h = torch.randn(6, ref.config.hidden_size, generator=torch.Generator().manual_seed(1))
    for i in layers:
        got, want = model.model.layers[i].adaptive_router, ref.model.layers[i].adaptive_router
        for name, p in want.named_parameters():
            assert torch.equal(getattr(got, name), p), (i, name)
        gate = model.model.layers[i].mlp.gate
        with torch.no_grad():
            logits = gate(h)[0]
            student = torch.nn.functional.linear(h, ref.model.layers[i].mlp.gate.weight) + want.residual(h)
        assert torch.allclose(logits, student.to(logits.dtype), atol=1e-6), i

    # the residual decides the routing: a large b2 on experts 0 and 1 sends every token there
    for i in layers:
        with torch.no_grad():
            model.model.layers[i].adaptive_router.w2.zero_()
            model.model.layers[i].adaptive_router.b2.fill_(-20.0)[:2] = 20.0
            _, _, idx = model.model.layers[i].mlp.gate(h)
        assert sorted(set(idx.flatten().tolist())) == [0, 1], (i, idx)
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=IDS).logits).all()


def test_student_routing_matches_softmax_top_k_of_the_student_logits(tmp_path):
    run_dir, ref = make_run(tmp_path, "qwen3_moe", mode="desmoe_no_dges")
    out = str(tmp_path / "export")
    export_run(run_dir, out)
    model = load_pretrained(out)
    h = torch.randn(10, ref.config.hidden_size, generator=torch.Generator().manual_seed(2))
    layer = ref.model.layers[0]
    with torch.no_grad():
        z = torch.nn.functional.linear(h, layer.mlp.gate.weight) + layer.adaptive_router.residual(h)
        top, idx = torch.softmax(z, dim=-1).topk(ref.config.num_experts_per_tok, dim=-1)
        top = top / top.sum(-1, keepdim=True)
        _, scores, got_idx = model.model.layers[0].mlp.gate(h)
    assert torch.equal(got_idx, idx)
    assert torch.allclose(scores, top, atol=1e-6)
    # zero residual: exactly the stock router
    plain = load_plain(out)
    with torch.no_grad():
        for p in (model.model.layers[0].adaptive_router.w2, model.model.layers[0].adaptive_router.b2):
            p.zero_()
        for a, b in zip(model.model.layers[0].mlp.gate(h), plain.model.layers[0].mlp.gate(h)):
            assert torch.equal(a, b)


def test_tokenizers(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<pad>", "<s>", "</s>", "<unk>", "one", "two", "three"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    hf_dir = tmp_path / "hf_tok"
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                            unk_token="<unk>").save_pretrained(hf_dir)
    run_dir, _ = make_run(tmp_path, data={"tokenizer": str(hf_dir)}, name="hf")
    meta = export_run(run_dir, str(tmp_path / "hf_out"))
    assert meta["tokenizer"]["kind"] == "transformers"
    assert AutoTokenizer.from_pretrained(tmp_path / "hf_out").encode("two three", add_special_tokens=False) == [5, 6]

    import sentencepiece as spm

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(f"line {i} of some text about numbers and words" for i in range(200)))
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(tmp_path / "sp"), vocab_size=40,
                                   model_type="bpe", pad_id=0, bos_id=1, eos_id=2, unk_id=3, minloglevel=2)
    run_dir, _ = make_run(tmp_path, data={"tokenizer": str(tmp_path / "sp.model")}, name="spm")
    meta = export_run(run_dir, str(tmp_path / "spm_out"))
    assert meta["tokenizer"]["kind"] == "sentencepiece" and meta["tokenizer"]["eos_id"] == 2
    assert (tmp_path / "spm_out" / SPM_FILE).read_bytes() == (tmp_path / "sp.model").read_bytes()

    run_dir, _ = make_run(tmp_path, name="byte")  # no tokenizer given, no model dir: bytes
    meta = export_run(run_dir, str(tmp_path / "byte_out"))
    assert meta["tokenizer"]["kind"] == "byte" and "259" in meta["tokenizer"]["note"]


def _cli(capsys, *args):
    code = cli_main(["export", *map(str, args)])
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    return code, out, err


def test_cli_errors_are_clear_and_exit_2(tmp_path, capsys):
    run_dir, _ = make_run(tmp_path)
    out = tmp_path / "export"

    def fails(*args, needles):
        code, _, err = _cli(capsys, *args)
        assert code == 2 and err.startswith("desmoe: error:"), (args, code, err)
        for n in needles:
            assert n in err, (args, err)

    fails(tmp_path / "nope", "--out", out, needles=["does not exist"])
    (tmp_path / "empty").mkdir()
    fails(tmp_path / "empty", "--out", out, needles=["not a desmoe run directory", "config.yaml"])
    fails(run_dir, "--out", out, "--checkpoint", "step99", needles=["--checkpoint step99", "step7"])
    fails(run_dir, "--out", run_dir, needles=["would replace the run directory"])
    fails(run_dir, "--out", tmp_path, needles=["would replace the run directory"])
    out.mkdir()
    (out / "keep.txt").write_text("x")
    fails(run_dir, "--out", out, needles=["is not empty", "--overwrite"])
    assert (out / "keep.txt").read_text() == "x"

    code, stdout, _ = _cli(capsys, run_dir, "--out", out, "--overwrite")
    assert code == 0 and f"exported {run_dir}/checkpoints/{TAG}" in stdout
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()
    assert [p for p in os.listdir(tmp_path) if p.startswith(".export")] == []  # no temporary left

    ckpt = os.path.join(run_dir, "checkpoints")
    with open(os.path.join(ckpt, "latest"), "w") as f:
        f.write("step9")
    fails(run_dir, "--out", tmp_path / "o2", needles=["names checkpoint 'step9'", "step7"])
    os.remove(os.path.join(ckpt, "latest"))
    fails(run_dir, "--out", tmp_path / "o2", needles=["latest does not exist", "--checkpoint"])
    os.remove(os.path.join(ckpt, TAG, "layer_1_expert_5_mp_rank_00_model_states.pt"))
    fails(run_dir, "--out", tmp_path / "o2", "--checkpoint", TAG,
          needles=["layer_1_expert_5_mp_rank_00_model_states.pt is missing"])
    assert not (tmp_path / "o2").exists()

    other, _ = make_run(tmp_path, name="other")
    cfg = yaml.safe_load(open(os.path.join(other, "config.yaml")))
    cfg["model"]["tiny"]["hidden_size"] = 32
    with open(os.path.join(other, "config.yaml"), "w") as f:
        yaml.safe_dump(cfg, f)
    fails(other, "--out", tmp_path / "o3", needles=["does not match the model built from the run's config",
                                                    "shape mismatch"])
    import shutil

    shutil.rmtree(os.path.join(other, "checkpoints"))
    fails(other, "--out", tmp_path / "o3", needles=["has no checkpoint"])
    with pytest.raises(SystemExit) as exit_:  # argparse: --out is required
        cli_main(["export", run_dir])
    assert exit_.value.code == 2 and "--out" in capsys.readouterr().err


def test_load_pretrained_refuses_a_directory_desmoe_did_not_write(tmp_path):
    build_tiny_model({"model_type": "olmoe"}, seed=0).save_pretrained(tmp_path / "plain")
    with pytest.raises(ExportError, match="not a directory written by desmoe export"):
        load_pretrained(str(tmp_path / "plain"))
