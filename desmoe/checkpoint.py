"""Checkpoints that are complete or absent: write under a temporary name, rename, then point ``latest``.

Layout of ``<run>/checkpoints/``::

    step20/                       one complete checkpoint (tag "step20")
        mp_rank_00_model_states.pt, expp_rank_*..., layer_*_expert_*...   DeepSpeed's files
        desmoe_state_rank<R>.pt   desmoe's state of rank R (step, sampler, RNG, DES-MoE state)
    step20.partial/               a save in progress (never loaded; removed by the next save)
    latest                        the tag of the newest complete checkpoint (replaced atomically)

A kill during a save leaves at most a ``.partial`` directory: the previous checkpoint and
``latest`` are untouched. The run directory must be on a file system every rank sees (as
for any DeepSpeed checkpoint).
"""

from __future__ import annotations

import os
import pickle
import random
import re
import shutil

import torch

from desmoe import dist, faults

CHECKPOINTS = "checkpoints"
PARTIAL = ".partial"
_TAG = re.compile(r"^step(\d+)$")


class CheckpointError(ValueError):
    """A run directory cannot be resumed (no checkpoint, incomplete, or made for another world size)."""


def tag_of(step: int) -> str:
    return f"step{step}"


def step_of(tag: str) -> int | None:
    m = _TAG.match(tag)
    return int(m.group(1)) if m else None


def complete_tags(root: str) -> list[str]:
    """Tags of the complete checkpoints under ``root``, oldest first."""
    if not os.path.isdir(root):
        return []
    tags = [t for t in os.listdir(root) if step_of(t) is not None and os.path.isdir(os.path.join(root, t))]
    return sorted(tags, key=step_of)


def latest_tag(root: str) -> str | None:
    """The tag ``latest`` names, if that checkpoint is complete; else the newest complete one."""
    path = os.path.join(root, "latest")
    tags = complete_tags(root)
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            tag = f.read().strip()
        if tag in tags:
            return tag
    return tags[-1] if tags else None


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
            stale = final + ".stale"
            shutil.rmtree(stale, ignore_errors=True)
            os.replace(final, stale)
            os.replace(partial, final)
            shutil.rmtree(stale)
        else:
            os.replace(partial, final)
        _write_text_atomic(os.path.join(root, "latest"), tag)
        for old in complete_tags(root)[:-keep]:
            if old != tag:
                shutil.rmtree(os.path.join(root, old), ignore_errors=True)
    dist.barrier()
    return final


def find_resumable(output_dir: str, world_size: int) -> tuple[str, str]:
    """(checkpoints root, tag) of the checkpoint a resumed run starts from; CheckpointError if none fits."""
    root = os.path.join(output_dir, CHECKPOINTS)
    tag = latest_tag(root)
    if tag is None:
        partial = [t for t in os.listdir(root) if t.endswith(PARTIAL)] if os.path.isdir(root) else []
        extra = f" (only the incomplete {', '.join(partial)}: the run was stopped during its first save)" if partial else ""
        raise CheckpointError(f"--resume {output_dir}: no complete checkpoint in {root}{extra}. Runs save one every "
                              "checkpoint.every steps and at the end (checkpoint.save_final); start a new run instead.")
    saved = len([f for f in os.listdir(os.path.join(root, tag)) if re.match(r"^desmoe_state_rank\d+\.pt$", f)])
    if saved != world_size or not all(os.path.isfile(state_file(os.path.join(root, tag), r)) for r in range(saved)):
        raise CheckpointError(f"--resume {output_dir}: checkpoint {tag} holds the state of {saved} rank(s), this job "
                              f"has {world_size}. Resume with the world size the run was saved with ({saved}).")
    return root, tag


def load_state(ckpt_dir: str, rank: int) -> dict:
    """This rank's desmoe state (tensors and plain values only: loaded with weights_only)."""
    return torch.load(state_file(ckpt_dir, rank), map_location="cpu", weights_only=True)


def save_best(engine, output_dir: str, best: dict, *, rank: int) -> str:
    """Replace ``checkpoints/best`` (the best periodic evaluation, never pruned or resumed from) with the
    current weights; ``best`` (step, metric, value) is written beside them as best.json. Every rank calls it."""
    import json

    root = os.path.join(output_dir, CHECKPOINTS)
    partial = os.path.join(root, "best" + PARTIAL)
    if rank == 0:
        os.makedirs(root, exist_ok=True)
        shutil.rmtree(partial, ignore_errors=True)
    dist.barrier()
    engine.save_checkpoint(root, tag="best" + PARTIAL, save_latest=False)
    dist.barrier()
    final = os.path.join(root, "best")
    if rank == 0:
        with open(os.path.join(partial, "best.json"), "w", encoding="utf-8") as f:
            json.dump(best, f)
        stale = final + ".stale"
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
    ce = engine.checkpoint_engine
    allowed = _deepspeed_safe_globals()

    def load(path: str, map_location=None):
        try:
            with torch.serialization.safe_globals(allowed):
                return torch.load(path, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError as e:
            found = re.search(r"GLOBAL ([\w.]+)", str(e))
            what = f"the object {found.group(1)}" if found else "objects that are not plain data"
            raise CheckpointError(f"{path} holds {what}; desmoe loads checkpoints as data only "
                                  "(torch.load weights_only=True), so it is not loaded. If this checkpoint comes "
                                  "from a source you trust, set checkpoint.trust_pickle=true.") from None

    ce.load = load
