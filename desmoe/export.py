"""Export a run's DeepSpeed checkpoint as a Hugging Face model directory, and load it back.

    desmoe export RUN_DIR --out DIR [--checkpoint TAG] [--overwrite]
    model = desmoe.load_pretrained(DIR)      # with the adaptive routers of a desmoe run

This module only converts: which checkpoint, and the content of its files, come from desmoe.checkpoint
(layout described there); the run's config from desmoe.rundir. The AutoEP names it converts: the
non-expert ``module`` state holds ``<moe>.router.gate.weight``, ``<moe>.shared_experts.*``, the router
alias ``<moe>.gate.gate.weight`` some presets add, and ``model.layers.<i>.adaptive_router.*`` in the ALR
modes, or ``<module>.base_layer.weight`` and ``<module>.lora_{A,B}.default.weight`` in lora mode (merged
into ``<module>.weight``: desmoe.lora.merge_state_dict); each per-expert file holds
``<module_path>.experts.w{1,2,3}.<g>``: w1 (gate) and w3 (up) [ffn, hidden], w2 (down) [hidden, ffn].

The inverse of AutoEP's conversion comes from AutoEP itself: its parser, run on the stock HF model
built from the run's config, names each MoE block's router, experts and shared experts and their
layout; fused ``gate_up_proj`` tensors are rebuilt in the layout the stock model uses.

The adaptive routers (desmoe, desmoe_no_dges) are not part of any stock architecture: they are
saved beside the model (``adaptive_routers.safetensors``, described in ``desmoe_export.json``) so
``AutoModelForCausalLM.from_pretrained(DIR)`` loads a plain model (its own, fine-tuned router
weights, no residual MLP), and ``load_pretrained(DIR)`` puts them back: router logits
``W h + W2·GELU(W1 h + b1) + b2``, exactly what the engine computed at evaluation.

The tokenizer is the one training used, written so that ``AutoTokenizer.from_pretrained(DIR)`` encodes
with training's ids, the byte tokenizer and desmoe's sentencepiece models included (save_tokenizer;
what equals what: HF_TOKENIZER_EQUALS).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import tempfile

import torch
from torch import nn

from desmoe import checkpoint, dist, lora, reshard, restrict
from desmoe.constants import LORA_MODE
from desmoe.data import ByteTokenizer, DataError, HFTokenizer, SentencePieceTokenizer, build_tokenizer, prompt_ids
from desmoe.models import Family, ModelError, build_tiny_model, get_family, load_pretrained_config
from desmoe.routing.alr import AdaptiveRouter
from desmoe.rundir import DS_CONFIG_FILE, load_run_config

EXPORT_META = "desmoe_export.json"
ALR_FILE = "adaptive_routers.safetensors"
SPM_FILE = "sentencepiece.model"
"""NOTE: not ``tokenizer.model``: from that name AutoTokenizer builds the model family's own tokenizer
class around the file, with other special ids, and does not say so."""
FORMAT_VERSION = 1
ALR_PARAMS = ("teacher_weight", "w1", "b1", "w2", "b2")
_ALR_KEY = re.compile(r"^(.+\.(\d+))\.adaptive_router\.(\w+)$")
"""Checkpoint keys of the adaptive routers: ``<decoder layer i>.adaptive_router.<name>`` (desmoe.method puts
each on its decoder layer, where the family's ``decoder_layers`` are)."""
logger = logging.getLogger(__name__)
_BYTE_NOTE = ("byte tokenizer: UTF-8 bytes, id 0 pad, 1 bos, 2 eos, byte b -> b + 3 (259 ids); "
              "desmoe.data.ByteTokenizer, and AutoTokenizer.from_pretrained(DIR), encode and decode it")


class ExportError(ValueError):
    """A checkpoint desmoe export cannot convert, or an export directory a user can fix (missing,
    incomplete, mismatched). Run directories raise desmoe.rundir.RunDirError, checkpoints that are missing
    or unreadable desmoe.checkpoint.CheckpointError."""


# ---------------------------------------------------------------------------------------------
# The checkpoint's experts
# ---------------------------------------------------------------------------------------------


def load_expert_weights(tag_dir: str, autoep_layers: list[dict]) -> dict[str, dict[str, torch.Tensor]]:
    """Every routed expert of every AutoEP layer, gathered from the per-expert files of all EP ranks.

    Returns {module_path: {"w1": [E, ffn, hidden], "w2": [E, hidden, ffn], "w3": [E, ffn, hidden]}}.
    """
    out = {}
    for layer in autoep_layers:
        prefix = layer["expert_key_prefix"]
        rows = {w: [] for w in ("w1", "w2", "w3")}
        for g, path, shard in checkpoint.read_expert_files(tag_dir, layer):
            for w in rows:
                key = f"{prefix}.{w}.{g}"
                if key not in shard:
                    raise ExportError(f"{path} has no {key!r}: the checkpoint is damaged or was not written by "
                                      "desmoe train.")
                rows[w].append(shard[key])
        out[layer["module_path"]] = {w: torch.stack(ts) for w, ts in rows.items()}
    return out


def load_zero3_weights(tag_dir: str, states: dict, *, trust_pickle: bool = False) -> tuple[dict[str, torch.Tensor],
                                                                                         dict]:
    """A ZeRO 3 checkpoint's full weights: (module_state, experts) as ZeRO 1/2's model states and
    load_expert_weights give them.

    ZeRO 3 keeps every weight partitioned in the ranks' optimizer shards (the model-states files hold empty
    tensors), and DeepSpeed's ``zero_to_fp32`` refuses AutoEP ZeRO 3 checkpoints; its universal converter is
    the expert-aware path (run once, into ``<tag>.universal`` beside the checkpoint, and reused while current:
    desmoe.reshard.convert, which also checks the files hold plain data unless ``trust_pickle``). Weights the
    optimizer does not hold (requires_grad off, e.g. the ALR teacher) come from the ranks'
    ``frozen_param_fragments``. Values are the fp32 master weights, cast to the run's precision (bf16 runs)."""
    universal = reshard.convert(os.path.dirname(tag_dir), os.path.basename(tag_dir), trust_pickle=trust_pickle)
    ds = states.get("ds_config") or {}
    dtype = torch.bfloat16 if (ds.get("bf16") or {}).get("enabled") else (
        torch.float16 if (ds.get("fp16") or {}).get("enabled") else torch.float32)

    def fp32(name: str) -> torch.Tensor | None:
        path = os.path.join(universal, "zero", name, "fp32.pt")
        if not os.path.isfile(path):
            return None
        obj = checkpoint.read_file(path)  # {"param": tensor, ...} (experts, ZeRO 1/2) or the tensor itself
        return obj["param"] if isinstance(obj, dict) else obj

    shapes = states.get("frozen_param_shapes") or {}
    full_shapes = {n: torch.Size(v) for group in (states.get("param_shapes") or []) for n, v in group.items()}
    full_shapes.update({n: torch.Size(v) for n, v in shapes.items()})
    rank_files = checkpoint.zero3_model_states_files(tag_dir)
    fragments = None
    module_state = {}
    aliases = {}
    for name in states["module"]:
        t = fp32(name)
        # AutoEP's router alias (<moe>.gate.gate.weight) is the router's own parameter under a second name
        original = re.sub(r"^(.*)\.\w+\.gate\.([^.]+)$", r"\1.router.gate.\2", name)
        if t is None and name not in shapes and original != name and original in states["module"]:
            aliases[name] = original
            continue
        if t is None:
            if name not in shapes:
                raise ExportError(f"{tag_dir}: {name} is neither in the optimizer shards nor among the frozen "
                                  "parameters: the checkpoint is incomplete.")
            if fragments is None:  # every rank's partition of the frozen weights, read once
                fragments = [checkpoint.read_file(f).get("frozen_param_fragments") or {} for f in rank_files]
            shape = torch.Size(shapes[name])
            t = torch.cat([fr[name].flatten() for fr in fragments])[:shape.numel()].view(shape)
        shape = full_shapes.get(name)
        if shape is not None and t.shape != shape:  # ZeRO 3's universal tensors can be flat
            t = t.flatten()[:shape.numel()].view(shape)
        module_state[name] = t.to(dtype)
    for name, original in aliases.items():
        module_state[name] = module_state[original]
    experts = {}
    for layer in states["ds_autoep_layers"]:
        prefix = layer["expert_key_prefix"]
        ws = {w: fp32(f"{prefix}.{w}") for w in ("w1", "w2", "w3")}
        missing = [w for w, t in ws.items() if t is None]
        if missing:
            raise ExportError(f"{universal} has no {prefix}.{missing[0]}: DeepSpeed's universal conversion of "
                              f"{tag_dir} is incomplete. Delete {universal} and export again.")
        experts[layer["module_path"]] = {w: t.to(dtype) for w, t in ws.items()}
    return module_state, experts


# ---------------------------------------------------------------------------------------------
# AutoEP names -> stock HF names
# ---------------------------------------------------------------------------------------------


def build_hf_model(cfg) -> nn.Module:
    """The stock HF causal LM the run fine-tuned, with placeholder weights (``model.tiny``: the same
    random build as training; ``model.path``: built from its config.json on the meta device)."""
    if cfg.model.tiny is not None:
        return build_tiny_model(cfg.model.tiny, seed=cfg.run.seed)
    import transformers

    config = load_pretrained_config(cfg.model.path, trust_remote_code=cfg.model.trust_remote_code)
    with torch.device("meta"):
        return transformers.AutoModelForCausalLM.from_config(config, trust_remote_code=cfg.model.trust_remote_code)


@contextlib.contextmanager
def _deepspeed_log_level(level: int):
    logger = logging.getLogger("DeepSpeed")
    old = logger.level
    logger.setLevel(level)
    try:
        yield
    finally:
        logger.setLevel(old)


def parse_moe_specs(model: nn.Module, expert_parallel: dict) -> list:
    """AutoEP's own description of each MoE block of the stock ``model`` (deepspeed MoELayerSpec list),
    from the ``expert_parallel`` section the run gave DeepSpeed. Needs no process group."""
    dist.setup_env()
    from deepspeed.module_inject.auto_ep import AutoEP
    from deepspeed.module_inject.auto_ep_config import parse_autoep_config

    # NOTE: the parser repeats warnings already shown at training time (route_scale, jitter).
    with _deepspeed_log_level(logging.ERROR):
        return AutoEP(model, parse_autoep_config(dict(expert_parallel))).ep_parser()


def router_alias(spec) -> str | None:
    """The second name AutoEP registers its router under (``<moe>.gate`` for presets whose HF output
    recorder captures router logits there); its keys duplicate ``<moe>.router.*``."""
    name = spec.router_logits_capture_layer_name or spec.router_name
    if spec.router_logits_capture_target != "router" or name == "router" or "." in name \
            or name in ("experts", "shared_experts"):
        return None
    return name


def experts_to_hf(spec, weights: dict[str, torch.Tensor], hf_shapes: dict[str, torch.Size]) -> dict:
    """Grouped expert tensors (w1/w3 [E, ffn, hidden], w2 [E, hidden, ffn]) -> the stock block's expert keys.

    Inverts deepspeed.moe.ep_repack.repack_expert_weights for the layout the stock model has
    (``hf_shapes``: its state-dict shapes).
    """
    from deepspeed.moe.fused_expert_layout import classify_fused_gate_up_layout

    p = f"{spec.moe_module_name}.{spec.experts_name}"
    w1, w2, w3 = weights["w1"], weights["w2"], weights["w3"]
    if spec.expert_storage == "fused_3d":
        if spec.expert_w3_name is not None:
            return {f"{p}.{spec.expert_w1_name}": w1, f"{p}.{spec.expert_w2_name}": w2,
                    f"{p}.{spec.expert_w3_name}": w3}
        k1, k2 = f"{p}.{spec.expert_w1_name}", f"{p}.{spec.expert_w2_name}"
        layout = classify_fused_gate_up_layout(tuple(hf_shapes[k1]), tuple(hf_shapes[k2]))
        if layout is None:
            raise ExportError(f"{k1} {tuple(hf_shapes[k1])} / {k2} {tuple(hf_shapes[k2])}: not a fused gate/up "
                              "expert layout AutoEP knows.")
        if layout.layout == "gate_up_first":  # [E, 2*ffn, hidden], [E, hidden, ffn]
            return {k1: torch.cat([w1, w3], dim=1), k2: w2}
        return {k1: torch.cat([w1, w3], dim=1).transpose(1, 2).contiguous(), k2: w2.transpose(1, 2).contiguous()}
    out = {}  # module_list: one module (or parameter) per expert
    for e in range(w1.shape[0]):
        def key(name):
            k = f"{p}.{e}.{name}"
            return k + ".weight" if k + ".weight" in hf_shapes else k

        if spec.expert_w3_name is None:
            out[key(spec.expert_w1_name)] = torch.cat([w1[e], w3[e]], dim=0)
        else:
            out[key(spec.expert_w1_name)], out[key(spec.expert_w3_name)] = w1[e], w3[e]
        out[key(spec.expert_w2_name)] = w2[e]
    return out


def convert_autoep_state_dict(module_state: dict, experts: dict[str, dict[str, torch.Tensor]], specs: list,
                              hf_shapes: dict[str, torch.Size]) -> tuple[dict, dict]:
    """(stock HF state dict, adaptive-router state dict) from a checkpoint's AutoEP-named weights.

    ``experts``: from load_expert_weights; ``hf_shapes``: the stock model's state-dict shapes.
    ExportError on a key that has no stock counterpart.
    """
    hf, alr = {}, {}
    blocks = {s.moe_module_name + ".": s for s in specs}
    aliases = []
    for key, t in module_state.items():
        if _ALR_KEY.match(key):
            alr[key] = t
            continue
        prefix = next((p for p in blocks if key.startswith(p)), None)
        if prefix is None:
            hf[key] = t
            continue
        spec, rest = blocks[prefix], key[len(prefix):]
        head, _, tail = rest.partition(".")
        if head == "router" and tail.startswith("gate."):
            hf[f"{prefix}{spec.router_name}.{tail[len('gate.'):]}"] = t
        elif head == "router" and tail == "e_score_correction_bias":
            hf[f"{prefix}{spec.e_score_correction_bias_path or spec.router_name}.{tail}"] = t
        elif head == "shared_experts" and spec.shared_experts_name:
            hf[f"{prefix}{spec.shared_experts_name}.{tail}"] = t
        elif head == "shared_experts_gate" and spec.shared_experts_gate_name:
            hf[f"{prefix}{spec.shared_experts_gate_name}.{tail}"] = t
        elif head == router_alias(spec):
            aliases.append((key, f"{prefix}router.{tail}", t))
        else:
            raise ExportError(f"checkpoint key {key!r} has no counterpart in the stock {spec.model_family} MoE block "
                              "(AutoEP load balancing or another feature desmoe does not export).")
    for key, original, t in aliases:
        if original not in module_state or not torch.equal(module_state[original], t):
            raise ExportError(f"checkpoint key {key!r} should repeat {original!r} (AutoEP's router alias) but "
                              "differs from it: the checkpoint is not one desmoe export understands.")
    for spec in specs:
        if spec.moe_module_name not in experts:
            raise ExportError(f"the checkpoint has no expert files for {spec.moe_module_name}.")
        hf.update(experts_to_hf(spec, experts[spec.moe_module_name], hf_shapes))
    extra = sorted(set(experts) - {s.moe_module_name for s in specs})
    if extra:
        raise ExportError(f"the checkpoint has experts for {', '.join(extra)}, which are not MoE blocks of the model "
                          "built from the run's config.")
    return hf, alr


def load_state_strict(model: nn.Module, state: dict, *, where: str) -> None:
    """Load ``state`` into ``model`` (tensors taken as they are: dtype of the checkpoint); every key must
    be present with the model's shape, else ExportError listing the differences."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = [f"{k} {tuple(state[k].shape)} (model: {tuple(expected[k].shape)})"
                  for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    if missing or unexpected or mismatched:
        def show(names):
            return ", ".join(names[:8]) + (f" and {len(names) - 8} more" if len(names) > 8 else "")

        parts = [f"missing {show(missing)}" if missing else "", f"unexpected {show(unexpected)}" if unexpected else "",
                 f"shape mismatch {show(mismatched)}" if mismatched else ""]
        raise ExportError(f"{where} does not match the model built from the run's config: "
                          f"{'; '.join(p for p in parts if p)}. Was config.yaml changed after the run?")
    model.load_state_dict(state, strict=True, assign=True)
    if getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()  # assign=True replaced the tied tensors by two loaded copies


def split_adaptive_routers(alr_state: dict, family: Family) -> tuple[dict, dict]:
    """(metadata, tensors) of the adaptive routers found in a checkpoint; ({}, {}) when there are none."""
    layers: dict[int, dict] = {}
    for key, t in alr_state.items():
        m = _ALR_KEY.match(key)
        layers.setdefault(int(m.group(2)), {})[m.group(3)] = t
    if not layers:
        return {}, {}
    for i, params in layers.items():
        if set(params) != set(ALR_PARAMS):
            raise ExportError(f"adaptive router of layer {i}: parameters {sorted(params)}, expected "
                              f"{list(ALR_PARAMS)}.")
    first = layers[min(layers)]
    meta = {
        "file": ALR_FILE,
        "layers": sorted(layers),
        "router_module": f"{family.moe_block_path('{layer}')}.{family.router_attr}",
        "keys": f"{family.layers_path}.{{layer}}.adaptive_router.{{name}}",
        "hidden_size": int(first["w1"].shape[1]),
        "router_hidden": int(first["w1"].shape[0]),
        "num_experts": int(first["w2"].shape[0]),
        "logits": "F.linear(h, gate.weight) + w2 @ GELU(w1 @ h + b1) + b2 (exact erf GELU)",
        "teacher_weight": "the frozen router weight from before fine-tuning (distillation target); not used "
                          "for routing",
    }
    return meta, {key: t.contiguous() for key, t in alr_state.items()}


# ---------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------

HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
"""The transformers tokenizer written for the byte tokenizer and for sentencepiece models: a
``tokenizers`` model built here, saved by transformers' own save_pretrained."""
HF_TOKENIZER_EQUALS = {
    "tok.encode(text, add_special_tokens=False)": "tokenizer.encode(text): training's ids of one segment (an "
                                                   "example's ids are its segments', concatenated: encode_example)",
    "tok(text)['input_ids']": "desmoe.data.prompt_ids(text, tokenizer): [bos] + tokenizer.encode(text), the ids "
                              "evaluation generates from; a packed training example is these + [eos]",
    "tok.decode(ids, skip_special_tokens=True)": "tokenizer.decode(ids) (for ids that decode to valid UTF-8)",
    "tok.pad_token_id, tok.bos_token_id, tok.eos_token_id": "tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id",
}
"""What equals what, ``tok = AutoTokenizer.from_pretrained(DIR)`` and ``tokenizer`` the one training used
(desmoe.data.build_tokenizer). Special-token text in the input (``<s>``) is encoded as text, as training
does (``split_special_tokens``). Decoding gives the text back for the byte tokenizer; for a sentencepiece
model, the text as sentencepiece normalised it (desmoe's models: nmt_nfkc, where tabs, newlines and runs
of spaces become one space), as training's decode does."""
_PROBES = ("def add(a, b):\n\treturn a  +   b\n", "  Leading and trailing spaces  ", "é, 中文, 😀 and ﬁ Ｈｅｌｌｏ ①",
           "<s>special</s> <pad> <unk> text", "aaaaaaa ====== ---- 0000000 ...", "x\x00y\x7f\u3000z\u00a0w", "", " ")
"""Texts the written tokenizer must encode exactly as training's before the export keeps it."""
_SPM_NORMAL, _SPM_UNKNOWN, _SPM_CONTROL, _SPM_USER_DEFINED = 1, 2, 3, 4  # sentencepiece's SentencePiece.Type
_SPM_UNIGRAM, _SPM_BPE = 1, 2  # its TrainerSpec.ModelType


def byte_tokenizer_backend():
    """desmoe.data.ByteTokenizer as a ``tokenizers.Tokenizer``: ids 0 ``<pad>``, 1 ``<s>``, 2 ``</s>``
    (special), byte b -> ``<0xBB>`` id b + 3; a BPE without merges whose byte fallback spells every
    character as its UTF-8 bytes, decoded back by the ByteFallback decoder."""
    from tokenizers import AddedToken, Tokenizer, decoders, models

    b = ByteTokenizer
    specials = {b.pad_id: "<pad>", b.bos_id: "<s>", b.eos_id: "</s>"}
    offset = b.vocab_size - 256
    vocab = {name: i for i, name in specials.items()} | {f"<0x{byte:02X}>": byte + offset for byte in range(256)}
    tok = Tokenizer(models.BPE(vocab, [], byte_fallback=True))
    tok.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse()])
    tok.add_special_tokens([AddedToken(name, special=True, normalized=False) for _, name in sorted(specials.items())])
    return tok


def sentencepiece_backend(path: str):
    """The sentencepiece model file ``path`` (BPE or unigram) as a ``tokenizers.Tokenizer``.

    Built from the model's own proto (sentencepiece's ``sentencepiece_model_pb2``, needs protobuf), as
    sentencepiece encodes: its normalizer (the precompiled charsmap of nmt_nfkc, then removing extra
    whitespace, the dummy ``▁`` prefix, spaces as ``▁``), its pieces with their ids, BPE merges in the
    order of their pieces' scores (sentencepiece merges the best-scoring pair first), byte fallback,
    control pieces as special tokens and user-defined pieces as added tokens. Returns (tokenizer, unk
    piece or None), or raises ValueError for a model this cannot express.

    NOTE: where two splits of one piece compete on overlapping text (``aa|a`` against ``a|aa``),
    sentencepiece merges the leftmost and tokenizers the split ranked first; desmoe's models (vocabularies
    512 and 2048) agree on every text of the built-in corpora, and save_hf_tokenizer checks its probes.
    """
    from sentencepiece import sentencepiece_model_pb2
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers

    proto = sentencepiece_model_pb2.ModelProto()
    with open(path, "rb") as f:
        proto.ParseFromString(f.read())
    trainer, norm = proto.trainer_spec, proto.normalizer_spec
    if trainer.treat_whitespace_as_suffix or proto.denormalizer_spec.precompiled_charsmap:
        raise ValueError("its whitespace-as-suffix or denormalizer options have no tokenizers counterpart")
    pieces = proto.pieces
    unk = next((p.piece for p in pieces if p.type == _SPM_UNKNOWN), None)
    if trainer.model_type == _SPM_BPE:
        scores = {p.piece: p.score for p in pieces if p.type in (_SPM_NORMAL, _SPM_USER_DEFINED)}
        merges = sorted(((piece[:k], piece[k:]) for piece in scores for k in range(1, len(piece))
                         if piece[:k] in scores and piece[k:] in scores),
                        key=lambda pair: (-scores[pair[0] + pair[1]], len(pair[0])))
        model = models.BPE({p.piece: i for i, p in enumerate(pieces)}, merges, unk_token=unk, fuse_unk=True,
                           byte_fallback=trainer.byte_fallback)
    elif trainer.model_type == _SPM_UNIGRAM:
        unk_id = next((i for i, p in enumerate(pieces) if p.type == _SPM_UNKNOWN), None)
        # sentencepiece's lattice holds only normal and user-defined pieces; tokenizers' holds every piece,
        # so the others (control, unknown, bytes) get a score no segmentation chooses over another
        model = models.Unigram([(p.piece, p.score if p.type in (_SPM_NORMAL, _SPM_USER_DEFINED) else -1e9)
                                for p in pieces], unk_id, trainer.byte_fallback)
    else:
        raise ValueError(f"sentencepiece model_type {trainer.model_type} (word or char) is not converted")
    tok = Tokenizer(model)
    steps = [normalizers.Precompiled(norm.precompiled_charsmap)] if norm.precompiled_charsmap else []
    if norm.remove_extra_whitespaces:
        steps += [normalizers.Replace(Regex(r"\A +| +\z"), ""), normalizers.Replace(Regex(" {2,}"), " ")]
    if norm.add_dummy_prefix:
        steps.append(normalizers.Prepend("▁"))
    if norm.escape_whitespaces:
        steps.append(normalizers.Replace(" ", "▁"))
    tok.normalizer = normalizers.Sequence(steps)
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
                                    + ([decoders.Strip(" ", 1, 0)] if norm.add_dummy_prefix else []))
    tok.add_tokens([AddedToken(p.piece, special=p.type == _SPM_CONTROL, normalized=False)
                    for p in pieces if p.type in (_SPM_CONTROL, _SPM_USER_DEFINED)])
    return tok, unk


def _tokenizer_disagreement(hf, tok) -> str | None:
    """The first way ``hf`` (a loaded transformers tokenizer) differs from training's ``tok`` on _PROBES."""
    unk = hf.unk_token_id
    for name, got, want in (("pad", hf.pad_token_id, tok.pad_id), ("bos", hf.bos_token_id, tok.bos_id),
                            ("eos", hf.eos_token_id, tok.eos_id)):
        if got != want:
            return f"{name} id {got}, training's {want}"
    for text in _PROBES:
        ids = tok.encode(text)
        got = hf(text)["input_ids"]
        if got != prompt_ids(text, tok):
            return f"{text!r} encodes as {got}, training's {prompt_ids(text, tok)}"
        if (unk is None or unk not in ids) and hf.decode(ids, skip_special_tokens=True) != tok.decode(ids):
            return f"{ids} decodes as {hf.decode(ids, skip_special_tokens=True)!r}, training's {tok.decode(ids)!r}"
    return None


def save_hf_tokenizer(backend, tok, out_dir: str, *, unk_token: str | None = None) -> dict:
    """Write ``backend`` (a ``tokenizers.Tokenizer`` with training's ids) as the transformers tokenizer of
    ``out_dir`` (HF_TOKENIZER_FILES), and check that AutoTokenizer reads it back as training's ``tok``
    (HF_TOKENIZER_EQUALS, on _PROBES). Returns the fields it adds to desmoe_export.json's tokenizer; when
    the check fails nothing is written and they say why (``transformers`` None)."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    name = backend.id_to_token
    hf = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token=name(tok.pad_id), eos_token=name(tok.eos_id), unk_token=unk_token,
        bos_token=name(tok.bos_id) if tok.bos_id is not None else None,
        add_bos_token=tok.bos_id is not None, add_eos_token=False,  # post-processor: [bos] + ids, as prompt_ids
        split_special_tokens=True)  # "<s>" in a text is text, as in training
    hf.save_pretrained(out_dir)
    config_file = os.path.join(out_dir, "tokenizer_config.json")
    with open(config_file, encoding="utf-8") as f:
        config = json.load(f)
    config["tokenizer_class"] = "PreTrainedTokenizerFast"  # the name transformers 4 and 5 both resolve
    with open(config_file, "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)
    problem = _tokenizer_disagreement(AutoTokenizer.from_pretrained(out_dir, local_files_only=True), tok)
    if problem is None:
        return {"transformers": "AutoTokenizer.from_pretrained(DIR)", "files": list(HF_TOKENIZER_FILES),
                "split_special_tokens": True, "add_bos_token": tok.bos_id is not None, "add_eos_token": False,
                "equals": HF_TOKENIZER_EQUALS}
    for f in HF_TOKENIZER_FILES:
        os.remove(os.path.join(out_dir, f))
    return _no_hf_tokenizer(f"the converted tokenizer would not encode as training did: {problem}")


def _no_hf_tokenizer(reason: str) -> dict:
    logger.warning("desmoe export: no Hugging Face tokenizer written (%s)", reason)
    return {"transformers": None, "transformers_note": f"no Hugging Face tokenizer files: {reason}"}


def save_tokenizer(cfg, out_dir: str) -> dict:
    """Write the run's tokenizer into ``out_dir``; returns its description for desmoe_export.json.

    The choice is the one training made (desmoe.data.build_tokenizer). A transformers tokenizer is
    saved with its own save_pretrained. The byte tokenizer and a sentencepiece model are written as
    transformers tokenizers (HF_TOKENIZER_FILES, built by byte_tokenizer_backend / sentencepiece_backend)
    that ``AutoTokenizer.from_pretrained(DIR)`` loads with training's ids (HF_TOKENIZER_EQUALS); the
    sentencepiece model file is also copied (SPM_FILE) as it is.
    """
    try:
        tok = build_tokenizer(cfg.data, cfg.model)
    except DataError as e:
        raise ExportError(f"tokenizer: {e}") from e
    if isinstance(tok, HFTokenizer):
        tok.tok.save_pretrained(out_dir)
        return {"kind": "transformers", "source": cfg.data.tokenizer or cfg.model.path}
    if isinstance(tok, SentencePieceTokenizer):
        shutil.copyfile(tok.path, os.path.join(out_dir, SPM_FILE))
        desc = {"kind": "sentencepiece", "file": SPM_FILE, "source": tok.path, "pad_id": tok.pad_id,
                "bos_id": tok.bos_id, "eos_id": tok.eos_id,
                "note": f"{SPM_FILE}: sentencepiece.SentencePieceProcessor(model_file=...) encodes as training"}
        try:
            backend, unk = sentencepiece_backend(tok.path)
        except ImportError as e:  # sentencepiece_model_pb2 needs protobuf
            return desc | _no_hf_tokenizer(f"converting the sentencepiece model needs a package that is missing: {e}")
        except ValueError as e:
            return desc | _no_hf_tokenizer(f"{tok.path}: {e}")
        return desc | save_hf_tokenizer(backend, tok, out_dir, unk_token=unk)
    assert isinstance(tok, ByteTokenizer), type(tok)
    return {"kind": "byte", "note": _BYTE_NOTE} | save_hf_tokenizer(byte_tokenizer_backend(), tok, out_dir)


# ---------------------------------------------------------------------------------------------
# Export
# ---------------------------------------------------------------------------------------------


def _check_out_dir(out_dir: str, run_dir: str, overwrite: bool) -> None:
    out, run = os.path.realpath(out_dir), os.path.realpath(run_dir)
    if out == run or run.startswith(out.rstrip(os.sep) + os.sep):
        raise ExportError(f"--out {out_dir} would replace the run directory {run_dir}. Choose another --out.")
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ExportError(f"--out {out_dir} exists and is not a directory. Choose another --out.")
    if os.path.isdir(out_dir) and os.listdir(out_dir) and not overwrite:
        raise ExportError(f"--out {out_dir} exists and is not empty. Choose a new directory, or pass --overwrite "
                          "to replace it.")


def export_run(run_dir: str, out_dir: str, *, tag: str | None = None, overwrite: bool = False,
               domain: str | None = None, prune: bool = False, coverage: float | None = None) -> dict:
    """Write the Hugging Face model of ``run_dir``'s checkpoint ``tag`` (default: ``latest``) to ``out_dir``.

    Writes config.json, model.safetensors (stock keys, experts of every EP rank), generation_config.json,
    the tokenizer (if there is one to save), adaptive_routers.safetensors (ALR modes), domain_experts.json
    (the modes with a per-domain selection: desmoe.restrict) and desmoe_export.json. With ``prune`` and
    ``domain``: only that domain's kept experts (desmoe.restrict.prune_plan), the same count in every
    layer, in a stock config that says so; with ``coverage`` too, the kept experts start from the domain's
    serving selection (desmoe.restrict.COVERAGE_RULE) instead of its training selection, and
    domain_experts.json / desmoe_export.json's "pruned" record the rule and coverage. The directory appears
    complete or not at all (written beside it, then renamed). Returns the desmoe_export.json content. On
    anything a user can fix: RunDirError (the run directory), CheckpointError (the checkpoint: none,
    missing files, unreadable), DomainError (a domain, coverage or pruning that cannot be), ExportError
    (the rest).
    """
    run_dir = os.path.abspath(run_dir)
    cfg = load_run_config(run_dir)
    mode = cfg.method.mode
    if prune and domain is None:
        raise ExportError("--prune needs --domain NAME: the domain whose experts the pruned model keeps.")
    if domain is not None and not prune:
        raise ExportError(f"--domain {domain} without --prune: a full export carries every domain's selection "
                          "already (desmoe.load_pretrained(DIR, domain=NAME) restricts its routing). Add --prune "
                          "to write a model with only that domain's experts.")
    if coverage is not None and not prune:
        raise ExportError(f"--coverage {coverage} without --prune: a full export carries every domain's affinity, "
                          "so the coverage is chosen when it is loaded (desmoe.load_pretrained(DIR, domain=NAME, "
                          "coverage=C)). Add --domain NAME --prune to write a model with only the experts that "
                          "cover that domain.")
    coverage = restrict.check_coverage(coverage)
    if domain is not None and mode not in restrict.SELECTION_MODES:
        raise restrict.DomainError(restrict.no_selection_message(mode, f"--domain {domain}"))
    tag, tag_dir = checkpoint.resolve(run_dir, tag)
    _check_out_dir(out_dir, run_dir, overwrite)

    states = checkpoint.read_model_states(tag_dir)
    module_state = states["module"]
    autoep_layers = states.get("ds_autoep_layers")
    if not autoep_layers:
        raise ExportError(f"{checkpoint.model_states_file(tag_dir)} has no AutoEP layer description "
                          "(ds_autoep_layers): it was not written by desmoe train with DeepSpeed AutoEP.")
    expert_parallel = (states.get("ds_config") or {}).get("expert_parallel") or _run_ds_config(run_dir)
    try:
        model = build_hf_model(cfg)
    except ModelError as e:
        raise ExportError(f"cannot build the run's model: {e}") from e
    family = get_family(model.config.model_type)
    specs = parse_moe_specs(model, expert_parallel)
    hf_shapes = {k: v.shape for k, v in model.state_dict().items()}
    if checkpoint.is_zero3(tag_dir):
        module_state, experts = load_zero3_weights(tag_dir, states, trust_pickle=cfg.checkpoint.trust_pickle)
    else:
        experts = load_expert_weights(tag_dir, autoep_layers)
    hf_state, alr_state = convert_autoep_state_dict(module_state, experts, specs, hf_shapes)
    del module_state, experts
    adapters = None
    if cfg.method.mode == LORA_MODE:
        try:  # the adapters merged into their base layers: a plain model
            hf_state, adapters = lora.merge_state_dict(hf_state, lora.scale(cfg.method))
        except ValueError as e:
            raise ExportError(f"checkpoint {tag_dir}: {e}") from e
        if not adapters:
            raise ExportError(f"the run trained in method.mode lora but checkpoint {tag} holds no LoRA adapters "
                              "(*.lora_A.default.weight).")
    load_state_strict(model, hf_state, where=f"checkpoint {tag_dir}")
    dtype = model.get_input_embeddings().weight.dtype  # bf16 runs save bf16 module weights
    model.config.dtype = dtype
    alr_meta, alr_tensors = split_adaptive_routers(alr_state, family)
    if cfg.method.mode in ("desmoe", "desmoe_no_dges") and not alr_meta:
        raise ExportError(f"the run trained in method.mode {cfg.method.mode} but checkpoint {tag} holds no "
                          "adaptive routers (model.layers.<i>.adaptive_router.*).")
    selection = None
    if mode in restrict.SELECTION_MODES:
        selection = restrict.run_selection(run_dir, mode, states.get("global_steps"))
    experts_of = None
    if selection is not None:
        moe_modules = [family.moe_block_path(i) for i in selection["layers"]]
        missing = sorted(set(moe_modules) - {s.moe_module_name for s in specs})
        if missing:
            raise ExportError(f"{selection['source']} names MoE layers {missing} the model built from the run's "
                              "config does not have. Was config.yaml changed after the run?")
        experts_of = restrict.domain_experts(selection, model, moe_modules, mode)
    pruned = None
    if prune:
        if experts_of is None:
            raise restrict.DomainError(
                f"--domain {domain}: {restrict.no_selection_yet(mode, tag, states.get('global_steps'))}")
        restrict.check_domain(experts_of, domain, f"--domain {domain}")
        model, alr_meta, alr_tensors, experts_of, pruned = _prune(model, cfg, family, specs, experts_of, domain,
                                                                 alr_meta, alr_tensors, coverage=coverage)

    parent = os.path.dirname(os.path.abspath(out_dir)) or "."
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(os.path.abspath(out_dir))}.", dir=parent)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp's 0700 is not what a user expects of an output directory
        model.save_pretrained(tmp)
        tokenizer = save_tokenizer(cfg, tmp)
        if alr_tensors:
            from safetensors.torch import save_file

            save_file(alr_tensors, os.path.join(tmp, ALR_FILE), metadata={"format": "pt"})
        if experts_of is not None:
            restrict.write_domain_experts(tmp, experts_of)
        meta = {
            "format": "desmoe-export", "version": FORMAT_VERSION,
            "run_dir": run_dir, "checkpoint": tag, "global_steps": states.get("global_steps"),
            "mode": cfg.method.mode, "model_type": family.model_type, "dtype": str(dtype).replace("torch.", ""),
            "ep_size": cfg.parallel.ep_size, "zero_stage": cfg.parallel.zero_stage,
            "moe_layers": [s.moe_module_name for s in specs],
            "adaptive_routers": alr_meta or None,
            "lora": None if adapters is None else {
                "merged": True, "rank": cfg.method.lora_rank, "alpha": cfg.method.lora_alpha,
                "scaling": lora.scale(cfg.method), "modules": sorted(adapters)},
            "tokenizer": tokenizer,
            "domain_experts": restrict.DOMAIN_EXPERTS_FILE if experts_of is not None else None,
            "pruned": pruned,
            "load": ("desmoe.load_pretrained(DIR) (with the adaptive routers)" if alr_meta else
                     "transformers.AutoModelForCausalLM.from_pretrained(DIR) or desmoe.load_pretrained(DIR)"),
        }
        with open(os.path.join(tmp, EXPORT_META), "w", encoding="utf-8") as f:
            json.dump(meta, f, indent=2)
        if os.path.isdir(out_dir):
            old = tmp + ".old"
            os.replace(out_dir, old)
            os.replace(tmp, out_dir)
            shutil.rmtree(old)
        else:
            os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return meta


def _param_count(model: nn.Module) -> tuple[int, int]:
    """(parameters, their bytes) of a model, each tensor once (``parameters()`` counts tied weights once)."""
    params = list(model.parameters())
    return sum(p.numel() for p in params), sum(p.numel() * p.element_size() for p in params)


def _prune(model, cfg, family, specs, experts_of: dict, domain: str, alr_meta: dict, alr_tensors: dict, *,
           coverage: float | None = None):
    """(pruned stock model, adaptive-router meta and tensors, domain_experts content, desmoe_export.json's
    "pruned") of ``domain``: desmoe.restrict.prune_plan's experts, the stock config updated. The plan starts
    from the allowed sets of the training selection, or with ``coverage`` of desmoe.restrict.COVERAGE_RULE;
    the rule and coverage are recorded in both."""
    import transformers

    experts_of = restrict.with_coverage(experts_of, coverage, where="--coverage")
    plan = restrict.prune_plan(experts_of, domain, family)
    k = plan["num_experts"]
    n_experts = experts_of["num_experts"]
    kept = dict(zip(experts_of["moe_modules"], plan["kept"]))
    full_params, full_bytes = _param_count(model)
    state = restrict.prune_state(model.state_dict(), specs, kept, n_experts)
    config = restrict.pruned_config(model.config, plan)
    with torch.device("meta"):
        pruned_model = transformers.AutoModelForCausalLM.from_config(
            config, trust_remote_code=cfg.model.trust_remote_code)
    try:
        load_state_strict(pruned_model, state, where=f"the pruned {domain} model")
    except ExportError as e:
        raise restrict.DomainError(
            f"--prune: this {family.model_type} model's config cannot describe {k} of its {n_experts} experts ({e}). "
            "Use restricted routing on the full export instead: desmoe.load_pretrained(DIR, domain=NAME).") from e
    for i, r in restrict.routers(pruned_model, experts_of["layers"]).items():
        if r.weight.shape[0] != k or r.top_k > k:
            raise restrict.DomainError(f"--prune: layer {i} of the pruned {family.model_type} model routes over "
                                       f"{r.weight.shape[0]} experts with top_k {r.top_k}, not {k}. Use restricted "
                                       "routing instead: desmoe.load_pretrained(DIR, domain=NAME).")
    if alr_tensors:
        alr_tensors = restrict.prune_adaptive_routers(alr_tensors, alr_meta["keys"],
                                                      dict(zip(experts_of["layers"], plan["kept"])))
        alr_meta = dict(alr_meta, num_experts=k)
    pruned_params, pruned_bytes = _param_count(pruned_model)
    pruned = {"domain": domain, "num_experts": k, "original_num_experts": n_experts,
              "rule": experts_of["rule"], "coverage": experts_of.get("coverage"),
              "config": plan["config"], "kept": kept,
              "note": "kept[moe module][j] is the original id of the pruned model's expert j (ascending)",
              "parameters": pruned_params, "original_parameters": full_params,
              "weight_bytes": pruned_bytes, "original_weight_bytes": full_bytes}
    return pruned_model, alr_meta, alr_tensors, restrict.pruned_domain_experts(experts_of, plan), pruned


def _run_ds_config(run_dir: str) -> dict:
    path = os.path.join(run_dir, DS_CONFIG_FILE)
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)["expert_parallel"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ExportError(f"cannot read the expert_parallel section of {path}: {e}.") from e


# ---------------------------------------------------------------------------------------------
# Loading an export
# ---------------------------------------------------------------------------------------------


def read_export_meta(path: str) -> dict:
    meta_file = os.path.join(path, EXPORT_META)
    if not os.path.isfile(meta_file):
        raise ExportError(f"{path} has no {EXPORT_META}: it is not a directory written by desmoe export. Load a "
                          "plain Hugging Face model with transformers.AutoModelForCausalLM.from_pretrained.")
    with open(meta_file, encoding="utf-8") as f:
        meta = json.load(f)
    if meta.get("format") != "desmoe-export" or int(meta.get("version", 0)) > FORMAT_VERSION:
        raise ExportError(f"{meta_file}: format {meta.get('format')!r} version {meta.get('version')!r} is not one "
                          f"this desmoe reads (desmoe-export version <= {FORMAT_VERSION}).")
    return meta


def load_pretrained(path: str, domain: str | None = None, coverage: float | None = None,
                    **from_pretrained_kwargs) -> nn.Module:
    """The model of a desmoe export directory, with its adaptive routers in place.

    ``from_pretrained_kwargs`` go to ``transformers.AutoModelForCausalLM.from_pretrained`` (dtype,
    device_map, ...). Each MoE layer's router then computes the logits the training engine
    computed: ``W h + W2·GELU(W1 h + b1) + b2``, W the fine-tuned router weight. With ``domain``, each
    MoE layer routes only among that domain's allowed experts (domain_experts.json; desmoe.restrict):
    DomainError for an unknown domain, or an export of a mode without a per-domain selection. The allowed
    experts are the run's training selection topped up (desmoe.restrict.ALLOWED_RULE), or with ``coverage``
    (0 < C <= 1) the domain's serving selection: per layer its most affine experts until they hold C of its
    affinity, topped up the same way (desmoe.restrict.COVERAGE_RULE). A pruned export accepts only the
    coverage it was pruned with.
    """
    import transformers

    if coverage is not None and domain is None:
        raise restrict.DomainError(f"desmoe.load_pretrained({path!r}, coverage={coverage!r}) without a domain: the "
                                   "coverage chooses a domain's allowed experts. Pass domain=NAME too.")
    coverage = restrict.check_coverage(coverage)
    meta = read_export_meta(path)
    experts_of = restrict.read_domain_experts(path, meta) if domain is not None else None
    if experts_of is not None:
        where = f"desmoe.load_pretrained({path!r}, domain={domain!r})"
        restrict.check_domain(experts_of, domain, where)
        experts_of = restrict.with_coverage(experts_of, coverage, where=f"{where}: coverage")
    model = transformers.AutoModelForCausalLM.from_pretrained(path, **from_pretrained_kwargs)
    alr = meta.get("adaptive_routers")
    if alr:
        from safetensors.torch import load_file

        alr_file = os.path.join(path, alr["file"])
        if not os.path.isfile(alr_file):
            raise ExportError(f"{alr_file} is missing: {EXPORT_META} says the model has adaptive routers. Export "
                              "the run again, or load the plain model with AutoModelForCausalLM.from_pretrained.")
        attach_adaptive_routers(model, load_file(alr_file), alr)
    if experts_of is not None:
        restrict.restrict_to_domain(model, experts_of, domain)
    return model


def attach_adaptive_routers(model: nn.Module, tensors: dict, meta: dict) -> None:
    """Put each layer's AdaptiveRouter back (on its decoder layer, ``.adaptive_router``, as in training) and
    hook its layer's router so the routing uses the student logits."""
    for i in meta["layers"]:
        router = model.get_submodule(meta["router_module"].format(layer=i))
        weight = router.weight
        alr = AdaptiveRouter(router_weight=weight.detach().float(), hidden=meta["router_hidden"], seed=0)
        state = {}
        for name in ALR_PARAMS:
            key = meta["keys"].format(layer=i, name=name)
            if key not in tensors:
                raise ExportError(f"{meta['file']} has no {key!r}: the export is incomplete.")
            state[name] = tensors[key]
        alr.load_state_dict(state, strict=True)
        alr.to(device=weight.device, dtype=weight.dtype)
        try:
            state = restrict.router_state(router)  # desmoe's hook: student logits, then any domain mask
        except restrict.DomainError as e:
            raise ExportError(f"desmoe.load_pretrained cannot attach the adaptive router: {e}") from e
        get_family(model.config.model_type).decoder_layers(model)[i].adaptive_router = alr
        state.alr = alr
