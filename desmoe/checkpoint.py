"""Checkpoints that are complete or absent: write under a temporary name, rename, then point ``latest``.

Which tags exist and which are complete, resuming, and reading checkpoint files safely all live here.

Layout of ``<run>/checkpoints/``::

    step20/                       one complete checkpoint (tag "step20")
        mp_rank_00_model_states.pt, expp_rank_*..., layer_*_expert_*...   DeepSpeed's files
        desmoe_state_rank<R>.pt   desmoe's state of rank R (step, sampler, RNG, DES-MoE state)
    step20.partial/               a save in progress (never loaded; removed by the next save)
    best/                         the best periodic evaluation (complete; never resumed from or pruned)
    latest                        the tag of the newest complete step checkpoint (replaced atomically)

A tag is complete when its directory (not ending ``.partial`` or ``.stale``) holds DeepSpeed's
``mp_rank_00_model_states.pt``; the ``step<N>`` tags (ordered by N) are the ones resumed from and
pruned. A kill during a save leaves at most a ``.partial`` directory: the previous checkpoint and
``latest`` are untouched. The run directory must be on a file system every rank sees (as for any
DeepSpeed checkpoint).

What the files hold (DeepSpeed 0.19.8, AutoEP, ZeRO 1/2), readable without any process group:

- ``<tag>/mp_rank_00_model_states.pt``: ``module`` = every non-expert weight under AutoEP's names,
  and ``ds_autoep_layers`` (per MoE layer: ``moe_layer_id``, ``module_path``, ``num_experts``,
  ``expert_key_prefix``).
- ``<tag>/layer_<moe_layer_id>_expert_<g>_mp_rank_00_model_states.pt``: one file per *global* expert g,
  written by the EP rank that holds it, with ``<module_path>.experts.w{1,2,3}.<g>``.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import re
import shutil
from typing import Iterator

import torch

from desmoe import dist, faults

CHECKPOINTS = "checkpoints"
PARTIAL = ".partial"
STALE = ".stale"
BEST = "best"
LATEST = "latest"
MODEL_STATES = "mp_rank_00_model_states.pt"
"""DeepSpeed's file of the non-expert weights (ZeRO 1/2): its presence makes a tag directory a complete checkpoint."""
MODEL_STATES_ZERO3 = "zero_pp_rank_0_mp_rank_00_model_states.pt"
"""Rank 0's model-states file under ZeRO 3 (weights partitioned: they live in the optimizer shards)."""
UNIVERSAL = ".universal"
_TAG = re.compile(r"^step(\d+)$")
_STATE_FILE = re.compile(r"^desmoe_state_rank(\d+)\.pt$")


class CheckpointError(ValueError):
    """A checkpoint a user asked for cannot be used (none, incomplete, damaged, unsafe to unpickle, or made
    for another world size)."""


def tag_of(step: int) -> str:
    return f"step{step}"


def step_of(tag: str) -> int | None:
    m = _TAG.match(tag)
    return int(m.group(1)) if m else None


def is_complete(root: str, tag: str) -> bool:
    """``root/tag`` is a complete checkpoint: not a save in progress or replaced, and DeepSpeed's model
    states are in it."""
    return not tag.endswith((PARTIAL, STALE, UNIVERSAL)) and model_states_file(os.path.join(root, tag)) is not None


def model_states_file(tag_dir: str) -> str | None:
    """DeepSpeed's (rank 0's) model-states file of a checkpoint: ZeRO 1/2's or ZeRO 3's; None if neither."""
    for name in (MODEL_STATES, MODEL_STATES_ZERO3):
        if os.path.isfile(os.path.join(tag_dir, name)):
            return os.path.join(tag_dir, name)
    return None


def is_zero3(tag_dir: str) -> bool:
    """The checkpoint was written under ZeRO stage 3 (partitioned weights)."""
    return (model_states_file(tag_dir) or "").endswith(MODEL_STATES_ZERO3)


def zero3_model_states_files(tag_dir: str) -> list[str]:
    """Every rank's model-states file of a ZeRO 3 checkpoint, by rank (the ranks of its desmoe state files)."""
    return [os.path.join(tag_dir, f"zero_pp_rank_{r}_mp_rank_00_model_states.pt") for r in saved_ranks(tag_dir)]


def to_universal(tag_dir: str, out_dir: str) -> str:
    """Convert one DeepSpeed checkpoint (ZeRO 1, 2 or 3, AutoEP experts included) into DeepSpeed's universal
    format with its own converter (``deepspeed.checkpoint.ds_to_universal``): ``out_dir/zero/<param>/fp32.pt``
    (+ ``exp_avg.pt``, ``exp_avg_sq.pt``) holds each full parameter, experts as [E_global, ...], independent of
    the world and EP size. Written under ``out_dir + ".partial"`` and renamed, so ``out_dir`` is complete or
    absent; an existing ``out_dir`` is replaced (desmoe.reshard.convert decides when one can be reused).
    Returns ``out_dir``. Runs in this process (no process group)."""
    import argparse
    import contextlib
    import io

    from deepspeed.checkpoint import ds_to_universal

    partial = out_dir + PARTIAL
    shutil.rmtree(partial, ignore_errors=True)
    args = argparse.Namespace(input_folder=tag_dir, output_folder=partial, num_extract_workers=1,
                              num_merge_workers=1, keep_temp_folder=False, strict=True, inject_missing_state=False)
    log = io.StringIO()
    try:
        with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):  # its progress bars too
            ds_to_universal.main(args)
    except Exception as e:
        shutil.rmtree(partial, ignore_errors=True)
        raise CheckpointError(f"cannot convert {tag_dir} to DeepSpeed's universal format ({type(e).__name__}: {e}). "
                              f"DeepSpeed's converter printed:\n{log.getvalue()[-2000:]}") from e
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(partial, out_dir)
    # DeepSpeed's converter points <parent>/latest_universal at the folder it wrote (the .partial name)
    _write_text_atomic(os.path.join(os.path.dirname(os.path.abspath(out_dir)), "latest_universal"),
                       os.path.basename(os.path.abspath(out_dir)))
    return out_dir


def tags(root: str) -> list[str]:
    """Every complete checkpoint tag under ``root`` (``best`` included), sorted by (length, name):
    step9 before step10."""
    if not os.path.isdir(root):
        return []
    return sorted((t for t in os.listdir(root) if is_complete(root, t)), key=lambda t: (len(t), t))


def complete_tags(root: str) -> list[str]:
    """The complete ``step<N>`` checkpoints under ``root`` (the resumable, prunable ones), oldest first."""
    return sorted((t for t in tags(root) if step_of(t) is not None), key=step_of)


def latest_tag(root: str) -> str | None:
    """The tag ``latest`` names, if that step checkpoint is complete; else the newest complete step one."""
    path = os.path.join(root, LATEST)
    steps = complete_tags(root)
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            tag = f.read().strip()
        if tag in steps:
            return tag
    return steps[-1] if steps else None


def state_file(ckpt_dir: str, rank: int) -> str:
    return os.path.join(ckpt_dir, f"desmoe_state_rank{rank}.pt")


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": _to_lists(random.getstate())}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_to_tuples(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _to_lists(x):
    return [_to_lists(v) for v in x] if isinstance(x, tuple) else x


def _to_tuples(x):
    return tuple(_to_tuples(v) for v in x) if isinstance(x, list) else x


def _write_text_atomic(path: str, text: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save(engine, output_dir: str, step: int, state: dict, *, keep: int, rank: int) -> str:
    """Save the DeepSpeed checkpoint and this rank's desmoe ``state`` as tag ``step<step>``; every rank calls it.

    Returns the complete checkpoint's directory. Keeps the newest ``keep`` complete checkpoints.
    """
    root = os.path.join(output_dir, CHECKPOINTS)
    tag = tag_of(step)
    partial = os.path.join(root, tag + PARTIAL)
    if rank == 0:
        os.makedirs(root, exist_ok=True)
        if os.path.exists(partial):
            shutil.rmtree(partial)  # left by a save that was killed
    dist.barrier()
    engine.save_checkpoint(root, tag=tag + PARTIAL, save_latest=False)
    torch.save(state, state_file(partial, rank))
    dist.barrier()  # every rank's files are written
    final = os.path.join(root, tag)
    if rank == 0 and faults.active("kill_in_save", step):
        faults.kill_self()
    if rank == 0:
        if os.path.exists(final):
            # the same step saved before (a resumed run repeating it): replace it
            stale = final + STALE
            shutil.rmtree(stale, ignore_errors=True)
            os.replace(final, stale)
            os.replace(partial, final)
            shutil.rmtree(stale)
            shutil.rmtree(final + UNIVERSAL, ignore_errors=True)  # converted from the replaced files
        else:
            os.replace(partial, final)
        _write_text_atomic(os.path.join(root, LATEST), tag)
        for old in complete_tags(root)[:-keep]:
            if old != tag:
                shutil.rmtree(os.path.join(root, old), ignore_errors=True)
                shutil.rmtree(os.path.join(root, old + UNIVERSAL), ignore_errors=True)
    dist.barrier()
    return final


def find_resumable(output_dir: str) -> tuple[str, str]:
    """(checkpoints root, tag) of the checkpoint a resumed run starts from; CheckpointError if none fits.

    Any world size can resume it: a job laid out as the checkpoint loads it as it is, any other through
    DeepSpeed's universal format (desmoe.reshard)."""
    root = os.path.join(output_dir, CHECKPOINTS)
    tag = latest_tag(root)
    if tag is None:
        partial = [t for t in os.listdir(root) if t.endswith(PARTIAL)] if os.path.isdir(root) else []
        extra = f" (only the incomplete {', '.join(partial)}: the run was stopped during its first save)" if partial else ""
        raise CheckpointError(f"--resume {output_dir}: no complete checkpoint in {root}{extra}. Runs save one every "
                              "checkpoint.every steps and at the end (checkpoint.save_final); start a new run instead.")
    saved = saved_ranks(os.path.join(root, tag))
    if not saved or saved != list(range(len(saved))):
        raise CheckpointError(f"--resume {output_dir}: checkpoint {tag} holds desmoe's state of rank(s) {saved}, not "
                              f"of ranks 0..{max(saved, default=0)}: it is damaged. Delete {os.path.join(root, tag)} "
                              "so that --resume uses the checkpoint before it.")
    return root, tag


def saved_ranks(tag_dir: str) -> list[int]:
    """The ranks whose desmoe state ``tag_dir`` holds (``desmoe_state_rank<R>.pt``), sorted."""
    return sorted(int(m.group(1)) for f in os.listdir(tag_dir) if (m := _STATE_FILE.match(f)))


def load_state(ckpt_dir: str, rank: int) -> dict:
    """This rank's desmoe state (tensors and plain values only: loaded with weights_only)."""
    return torch.load(state_file(ckpt_dir, rank), map_location="cpu", weights_only=True)


def load(engine, root: str, tag: str, *, rank: int, trust_pickle: bool) -> dict:
    """Load checkpoint ``tag`` of ``root`` into ``engine`` (weights, optimizer, LR schedule; read safely
    unless ``trust_pickle``) and return this rank's desmoe state. Every rank calls it."""
    use_safe_loading(engine, trust_pickle=trust_pickle)
    load_path, _ = engine.load_checkpoint(root, tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True)
    if load_path is None:
        raise CheckpointError(f"--resume: DeepSpeed could not load {os.path.join(root, tag)}.")
    return load_state(os.path.join(root, tag), rank)


def resolve(run_dir: str, tag: str | None = None) -> tuple[str, str]:
    """(tag, tag directory) of the complete checkpoint ``tag`` of a run, or of the one ``checkpoints/latest``
    names; CheckpointError otherwise (for ``--checkpoint TAG`` of desmoe export and eval)."""
    root = os.path.join(run_dir, CHECKPOINTS)
    found = tags(root)
    listing = f"Complete checkpoints: {', '.join(found)}." if found else ""
    if tag is None:
        latest = os.path.join(root, LATEST)
        if not os.path.isfile(latest):
            if not found:
                raise CheckpointError(f"{run_dir} has no checkpoint ({root}/latest does not exist). Runs save one at "
                                      "the end (checkpoint.save_final: true) and every checkpoint.every steps; train "
                                      "to the end, or pass a run directory that has one.")
            raise CheckpointError(f"{root}/latest does not exist. {listing} Pick one with --checkpoint TAG.")
        with open(latest, encoding="utf-8") as f:
            tag = f.read().strip()
        if tag not in found:
            raise CheckpointError(f"{latest} names checkpoint {tag!r}, which is missing or incomplete in {root}. "
                                  f"{listing or 'There is no complete checkpoint.'} Pick one with --checkpoint TAG.")
    elif tag not in found:
        raise CheckpointError(f"--checkpoint {tag}: no complete checkpoint with that tag in {root}. "
                              f"{listing or 'There is no complete checkpoint.'}")
    return tag, os.path.join(root, tag)


def read_file(path: str):
    """The content of one checkpoint file, read as data only (torch.load weights_only, on the CPU), for
    desmoe export; CheckpointError if it is missing or cannot be read."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError as e:
        raise CheckpointError(f"{path} is missing: the checkpoint is incomplete. Export another one with "
                              "--checkpoint TAG.") from e
    except Exception as e:  # a truncated or foreign file: torch raises several types
        raise CheckpointError(f"cannot read {path} ({type(e).__name__}: {e}). The checkpoint is damaged; export "
                              "another one with --checkpoint TAG.") from e


def read_model_states(tag_dir: str) -> dict:
    """The content of ``tag_dir``'s model-states file (``module``: the non-expert state under AutoEP's names,
    ``ds_autoep_layers``, ``ds_config``, ``global_steps``, ...); CheckpointError if it holds no module state."""
    path = model_states_file(tag_dir) or os.path.join(tag_dir, MODEL_STATES)
    states = read_file(path)
    if not isinstance(states, dict) or not isinstance(states.get("module"), dict):
        raise CheckpointError(f"{path} holds no module state: not a DeepSpeed checkpoint written by desmoe train.")
    return states


def read_expert_files(tag_dir: str, layer: dict) -> Iterator[tuple[int, str, dict]]:
    """(global expert g, path, content) of each per-expert file of one AutoEP layer (an entry of
    ``ds_autoep_layers``), g = 0, 1, ...: the files of every EP rank, read one at a time."""
    fmt = layer.get("checkpoint_format", "per_expert_files")
    if fmt != "per_expert_files":
        raise CheckpointError(f"{tag_dir}: experts of {layer['module_path']} are stored as {fmt!r}; desmoe export "
                              "reads the per-expert files DeepSpeed writes under ZeRO 1 and 2.")
    for g in range(int(layer["num_experts"])):
        path = os.path.join(tag_dir, f"layer_{layer['moe_layer_id']}_expert_{g}_{MODEL_STATES}")
        yield g, path, read_file(path)


def save_best(engine, output_dir: str, best: dict, *, rank: int) -> str:
    """Replace ``checkpoints/best`` (the best periodic evaluation, never pruned or resumed from) with the
    current weights; ``best`` (step, metric, value) is written beside them as best.json. Every rank calls it."""
    root = os.path.join(output_dir, CHECKPOINTS)
    partial = os.path.join(root, BEST + PARTIAL)
    if rank == 0:
        os.makedirs(root, exist_ok=True)
        shutil.rmtree(partial, ignore_errors=True)
    dist.barrier()
    engine.save_checkpoint(root, tag=BEST + PARTIAL, save_latest=False)
    dist.barrier()
    final = os.path.join(root, BEST)
    if rank == 0:
        with open(os.path.join(partial, "best.json"), "w", encoding="utf-8") as f:
            json.dump(best, f)
        stale = final + STALE
        shutil.rmtree(stale, ignore_errors=True)
        if os.path.exists(final):
            os.replace(final, stale)
        os.replace(partial, final)
        shutil.rmtree(stale, ignore_errors=True)
    dist.barrier()
    return final


def _deepspeed_safe_globals() -> list:
    """The few DeepSpeed classes its checkpoints pickle besides plain data and tensors."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def use_safe_loading(engine, *, trust_pickle: bool = False) -> None:
    """Make the engine read checkpoints with ``torch.load(weights_only=True)`` (plain data, tensors and
    DeepSpeed's own small classes) instead of DeepSpeed's default full unpickling, which would run code
    from a tampered file. ``trust_pickle`` (checkpoint.trust_pickle) keeps DeepSpeed's default."""
    if trust_pickle:
        return
    engine.checkpoint_engine.load = safe_load


def safe_load(path: str, map_location=None, *, mmap: bool = False):
    """``torch.load(path, weights_only=True)`` with DeepSpeed's few own classes allowed; CheckpointError naming
    the object if the file holds anything else. ``mmap``: map the tensors instead of reading them (cheap
    when only the metadata or the check matters)."""
    try:
        with torch.serialization.safe_globals(_deepspeed_safe_globals()):
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        what = f"the object {found.group(1)}" if found else "objects that are not plain data"
        raise CheckpointError(f"{path} holds {what}; desmoe loads checkpoints as data only "
                              "(torch.load weights_only=True), so it is not loaded. If this checkpoint comes "
                              "from a source you trust, set checkpoint.trust_pickle=true.") from None
