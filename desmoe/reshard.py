"""Resume on another world size or EP size: DeepSpeed's universal checkpoint for the engine, desmoe's own
state mapped onto the new ranks (docs/resume.md).

A checkpoint holds DeepSpeed's files laid out for the ranks that wrote it (ZeRO partitions of the flat
optimizer state, experts split by EP rank) and one ``desmoe_state_rank<R>.pt`` per rank. A job with the
same world size and ``parallel.ep_size`` loads them as they are (desmoe.checkpoint.load: bit-exact). Any
other job goes through here:

- rank 0 converts the checkpoint once with DeepSpeed's own converter (``checkpoint.to_universal``) into
  ``<tag>.universal/`` beside it (reused while it matches the checkpoint), and the engine, built with
  ``"checkpoint": {"load_universal": true}``, slices every full fp32 weight and Adam moment for its own
  ZeRO partition and EP rank: weights, moments, Adam step, LR schedule and DeepSpeed's step counters
  carry over exactly (``fill_stateless_groups``, ``restore_param_groups``, ``drop_filled_state``: what
  the converter and loader need or get wrong about desmoe's optimizer groups);
- desmoe's state is mapped by ``map_state`` (pure): what every rank holds alike (step, phase, λ, affinity
  EMA, masks, evaluation so far) from rank 0's file; the affinity window's routing counts summed over the
  old ranks and held by new rank 0, so the next all-reduce sees the same totals; the sampler continues each
  domain from the furthest position any old rank reached, split over the new ranks; per-rank RNG streams
  cannot carry over to a different number of ranks and are re-seeded from (run.seed, step, rank).
  With the same world size (only ``ep_size`` changed) every rank keeps its own state, RNG included.

Pure of process groups except ``load`` (every rank calls it; rank 0 converts, the others wait).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import shutil

import torch

from desmoe import checkpoint, dist
from desmoe.checkpoint import CheckpointError

SOURCE_FILE = "desmoe_source.json"
"""In ``<tag>.universal/``: which model-states file (size, mtime) it was converted from (a missing or other
one means it is stale: the checkpoint was saved again, and it is converted anew), and which optimizer groups
had no state in the checkpoint (``stateless_groups``)."""
FILLED = ".universal.source.partial"
"""Beside the tag while it converts: the checkpoint's files (linked) with the optimizer files that needed
moments for their stateless groups rewritten (``fill_stateless_groups``); removed after the conversion."""


@dataclasses.dataclass(frozen=True)
class Layout:
    """How a checkpoint was laid out: the ranks that wrote it and their EP size."""

    world_size: int
    ep_size: int
    zero3: bool = False

    def describe(self) -> str:
        return f"{self.world_size} rank{'s' if self.world_size != 1 else ''} (ep {self.ep_size})"


def read_layout(tag_dir: str) -> Layout:
    """The world size (its ``desmoe_state_rank<R>.pt`` files, R = 0..W-1) and EP size (DeepSpeed's
    ``ds_autoep_layers``, else ``ds_config.expert_parallel.autoep_size``, else 1) a checkpoint was saved
    with. Reads the model-states file's metadata only (memory-mapped, no weights)."""
    ranks = checkpoint.saved_ranks(tag_dir)
    if not ranks or ranks != list(range(len(ranks))):
        raise CheckpointError(f"{tag_dir}: desmoe's per-rank state files are incomplete (found ranks {ranks}, "
                              f"expected desmoe_state_rank0.pt ... rank{max(ranks, default=0)}.pt). The checkpoint "
                              "is damaged; delete it so that --resume uses the one before.")
    path = checkpoint.model_states_file(tag_dir)
    if path is None:
        raise CheckpointError(f"{tag_dir} holds no DeepSpeed model-states file: not a complete checkpoint.")
    states = checkpoint.safe_load(path, mmap=True)
    ep_sizes = {int(layer["ep_size"]) for layer in states.get("ds_autoep_layers") or [] if "ep_size" in layer}
    if len(ep_sizes) > 1:
        raise CheckpointError(f"{path}: MoE layers saved with different EP sizes {sorted(ep_sizes)}; desmoe "
                              "writes one parallel.ep_size for every layer.")
    if not ep_sizes:
        ep_sizes = {int(((states.get("ds_config") or {}).get("expert_parallel") or {}).get("autoep_size", 1))}
    return Layout(world_size=len(ranks), ep_size=ep_sizes.pop(), zero3=checkpoint.is_zero3(tag_dir))


def plan(tag_dir: str, *, world_size: int, ep_size: int) -> Layout | None:
    """The saved layout if this job (``world_size`` ranks, ``ep_size``) must load the checkpoint through the
    universal format; None when the layouts match (the same-size, bit-exact path)."""
    saved = read_layout(tag_dir)
    if saved.world_size == world_size and saved.ep_size == ep_size:
        return None
    if ep_size < 1 or world_size % ep_size:  # NOTE: config.validate refuses it first; checked again here
        raise CheckpointError(f"parallel.ep_size={ep_size} does not divide the world size {world_size}: "
                              "pass an ep_size that divides it (e.g. parallel.ep_size=1).")
    return saved


def universal_ds_config(ds_config: dict) -> dict:
    """``ds_config`` with DeepSpeed's universal-checkpoint loading on (``checkpoint.load_universal``)."""
    return {**ds_config, "checkpoint": {**ds_config.get("checkpoint", {}), "load_universal": True}}


def universal_dir(root: str, tag: str) -> str:
    return os.path.join(root, tag + checkpoint.UNIVERSAL)


def _source_stamp(tag_dir: str) -> dict:
    path = checkpoint.model_states_file(tag_dir)
    st = os.stat(path)
    return {"model_states": os.path.basename(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def read_source(udir: str) -> dict | None:
    """``udir``'s SOURCE_FILE ({"source": stamp, "stateless_groups": [...]}), or None."""
    try:
        with open(os.path.join(udir, SOURCE_FILE), encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def is_current(tag_dir: str, udir: str) -> bool:
    """``udir`` is a complete universal conversion of the checkpoint now in ``tag_dir``."""
    source = read_source(udir)
    return (isinstance(source, dict) and source.get("source") == _source_stamp(tag_dir)
            and os.path.isdir(os.path.join(udir, "zero")))


def convert(root: str, tag: str, *, trust_pickle: bool) -> str:
    """``<tag>.universal/`` of checkpoint ``root/tag``: reused when current, else converted (one process).
    Unless ``trust_pickle``, every file is first checked to hold plain data only (DeepSpeed's converter and
    universal loader unpickle in full). Returns the directory; CheckpointError if it cannot be made."""
    tag_dir, udir = os.path.join(root, tag), universal_dir(root, tag)
    if not is_current(tag_dir, udir):
        if not trust_pickle:
            check_plain_data(tag_dir)
        shutil.rmtree(udir, ignore_errors=True)
        filled = os.path.join(root, tag + FILLED)
        try:
            source, stateless = fill_stateless_groups(tag_dir, filled, trust_pickle=trust_pickle)
            checkpoint.to_universal(source, udir)
        finally:
            shutil.rmtree(filled, ignore_errors=True)
        # NOTE: written after the rename: a kill in between leaves no stamp, so the next job converts again
        with open(os.path.join(udir, SOURCE_FILE), "w", encoding="utf-8") as f:
            json.dump({"source": _source_stamp(tag_dir), "stateless_groups": stateless}, f)
    if not trust_pickle:
        check_plain_data(udir)  # also a reused one: DeepSpeed reads these files with full unpickling
    return udir


def fill_stateless_groups(tag_dir: str, work_dir: str, *, trust_pickle: bool = False) -> tuple[str, list[int]]:
    """ZeRO 1/2: DeepSpeed's converter needs Adam moments for every optimizer group, and MaskedAdamW creates
    none for a group that has only been frozen so far (LR 0: the backbone under the paper's phases, ESFT's
    router). Such groups get what their first real step would create (zero moments, step 0) in copies of the
    optimizer files under ``work_dir`` (the other files linked). Returns (the directory to convert: ``tag_dir``
    itself when nothing was missing, the stateless group indices)."""
    stateless: set[int] = set()
    rewritten = []
    for name in sorted(os.listdir(tag_dir)):
        if not name.endswith("_optim_states.pt"):
            continue
        path = os.path.join(tag_dir, name)
        sd = torch.load(path, map_location="cpu", weights_only=False) if trust_pickle else checkpoint.safe_load(
            path, map_location="cpu")
        osd = sd.get("optimizer_state_dict") if isinstance(sd, dict) else None
        base = osd.get("base_optimizer_state") if isinstance(osd, dict) else None
        flats = osd.get("single_partition_of_fp32_groups") if isinstance(osd, dict) else None
        if not isinstance(base, dict) or flats is None:  # ZeRO 3 (it keeps state for every group) or other
            continue
        changed = False
        for gid, group in enumerate(base["param_groups"]):
            for index in group["params"]:
                if "exp_avg" not in base["state"].get(index, {}):
                    flat = flats[gid]
                    base["state"][index] = {"step": torch.tensor(0.0), "exp_avg": torch.zeros_like(flat),
                                            "exp_avg_sq": torch.zeros_like(flat)}
                    stateless.add(gid)
                    changed = True
        if changed:
            os.makedirs(work_dir, exist_ok=True)
            torch.save(sd, os.path.join(work_dir, name))
            rewritten.append(name)
        del sd
    if not rewritten:
        return tag_dir, []
    for name in os.listdir(tag_dir):
        if name not in rewritten:
            os.symlink(os.path.abspath(os.path.join(tag_dir, name)), os.path.join(work_dir, name))
    return work_dir, sorted(stateless)


def check_plain_data(directory: str) -> None:
    """Every ``*.pt`` file under ``directory`` unpickles as plain data (desmoe.checkpoint.safe_load, memory-
    mapped: tensors are not read); CheckpointError naming the first that does not."""
    for dirpath, _, files in sorted(os.walk(directory)):
        for name in sorted(files):
            if name.endswith(".pt"):
                checkpoint.safe_load(os.path.join(dirpath, name), mmap=True)


def load(engine, root: str, tag: str, saved: Layout, *, rank: int, world_size: int, seed: int,
         trust_pickle: bool) -> dict:
    """Load checkpoint ``root/tag`` (saved with layout ``saved``) into ``engine`` (built with
    ``universal_ds_config``) through DeepSpeed's universal format, and return this rank's desmoe state
    (``map_state``). Every rank calls it: rank 0 converts, then every rank loads."""
    udir = None
    error = None
    if rank == 0:
        try:
            udir = convert(root, tag, trust_pickle=trust_pickle)
        except (CheckpointError, OSError) as e:  # (an OSError too: rank 0 alone must not leave the others waiting)
            error = (f"{e}\nResume on the layout the checkpoint was saved with ({saved.world_size} rank(s), "
                     f"parallel.ep_size={saved.ep_size}): it needs no conversion.")
    error = dist.broadcast_object(error)  # every rank stops together on a conversion error
    if error is not None:
        raise CheckpointError(error)
    udir = universal_dir(root, tag) if udir is None else udir
    checkpoint.use_safe_loading(engine, trust_pickle=trust_pickle)
    names = [g.get("name") for g in engine.optimizer.param_groups]
    try:
        load_path, _ = engine.load_checkpoint(root, tag=os.path.basename(udir), load_optimizer_states=True,
                                              load_lr_scheduler_states=True)
    except CheckpointError:
        raise
    except (AssertionError, KeyError, RuntimeError, ValueError) as e:
        raise CheckpointError(f"--resume: DeepSpeed could not load the universal checkpoint {udir} on "
                              f"{world_size} rank(s) ({type(e).__name__}: {e}). Resume on the checkpoint's layout, "
                              f"{saved.describe()}.") from e
    if load_path is None:
        raise CheckpointError(f"--resume: DeepSpeed could not load {udir}.")
    restore_param_groups(engine, udir, names, zero3=saved.zero3, trust_pickle=trust_pickle)
    drop_filled_state(engine, (read_source(udir) or {}).get("stateless_groups", []))
    tag_dir = os.path.join(root, tag)
    states = [checkpoint.load_state(tag_dir, r) for r in range(saved.world_size)]
    return map_state(states, rank=rank, world_size=world_size, seed=seed)


def restore_param_groups(engine, udir: str, names: list, *, zero3: bool, trust_pickle: bool = False) -> None:
    """Put back what DeepSpeed's universal load gets wrong about the optimizer's groups.

    ZeRO 1/2 copies each saved group's settings into the group of the same index, its ``name`` too: an
    expert group would be called after the old EP size (``ep_size_2`` on a job with ``ep_size_1``); the
    names this job's engine gave its groups (``names``, read before the load) are restored. ZeRO 3 copies
    group 0's settings into every group and group 0's Adam step into every sub-group; desmoe's groups
    differ in both (a frozen backbone has step 0, the LR factors read the group names), so each group's
    own settings and step are restored from ``zero/optimizer_state.pt``."""
    if zero3:
        # NOTE: ZeRO 3's base optimizer holds one flat fp32 tensor per sub-group (fp32_partitioned_groups_flat,
        # sub_group_to_group_id: DeepSpeed 0.19.8's stage3.py); its state_dict lists each group's sub-groups
        opt = engine.optimizer
        path = os.path.join(udir, "zero", "optimizer_state.pt")
        saved = (torch.load(path, map_location="cpu", weights_only=False) if trust_pickle
                 else checkpoint.safe_load(path, map_location="cpu"))["optimizer_state_dict"]
        groups, states = saved["param_groups"], saved["state"]
        if len(groups) != len(opt.optimizer.param_groups):
            raise CheckpointError(f"{udir}: {len(groups)} optimizer groups saved, this job has "
                                  f"{len(opt.optimizer.param_groups)}: resume with the config the run was saved with.")
        for group, saved_group in zip(opt.optimizer.param_groups, groups):
            group.update({k: v for k, v in saved_group.items() if k != "params"})
        for sub, flat in enumerate(opt.fp32_partitioned_groups_flat):
            first = groups[opt.sub_group_to_group_id[sub]]["params"]
            step = states.get(first[0], {}).get("step") if first else None
            if step is not None:
                opt.optimizer.state[flat]["step"] = step.clone() if torch.is_tensor(step) else step
    for group, name in zip(engine.optimizer.param_groups, names):
        if name is not None:
            group["name"] = name


def drop_filled_state(engine, groups: list[int]) -> None:
    """ZeRO 1/2: remove the zero moments ``fill_stateless_groups`` gave groups that had no optimizer state in
    the checkpoint, so this job holds what the checkpoint held (no moments for them, until they first train)."""
    opt = engine.optimizer
    for gid in groups:
        for flat in opt.optimizer.param_groups[gid]["params"]:
            opt.optimizer.state.pop(flat, None)
        for lp in opt.bit16_groups[gid]:
            if getattr(lp, "_hp_mapping", None) is not None:
                lp._hp_mapping.optim_fragment = {}


# ---- desmoe's state on the new ranks (pure) ------------------------------------------------------


def map_state(states: list[dict], *, rank: int, world_size: int, seed: int) -> dict:
    """New rank ``rank`` of ``world_size``'s desmoe state from the old ranks' ``states`` (one per old rank,
    as train.save_checkpoint wrote them). Same number of ranks: rank r's own state, unchanged. Otherwise:
    rank 0's global fields, ``map_sampler``, ``map_method``, and RNG from ``reseeded_rng_state``."""
    steps = {int(s["step"]) for s in states}
    if len(steps) != 1:
        raise CheckpointError(f"the per-rank states of one checkpoint disagree on the step ({sorted(steps)}): "
                              "the checkpoint is damaged; delete it so that --resume uses the one before.")
    if len(states) == world_size:
        return states[rank]
    step = steps.pop()
    return {**states[0], "world_size": world_size, "sampler": map_sampler([s["sampler"] for s in states]),
            "method": map_method([s["method"] for s in states], rank=rank),
            "rng": reseeded_rng_state(seed, step, rank)}


def map_sampler(states: list[dict]) -> dict:
    """DomainSampler state for any new rank: the micro-step (the same on every old rank) and, per domain,
    the furthest global row position an old rank reached. With data.sync_domains (the default) every old
    rank holds the same positions, so the data continues exactly where it stopped (the next rows of each
    domain's epoch permutation, now split over the new ranks); without it, rows an old rank had not reached
    yet in that epoch are skipped."""
    micro = {int(s["micro_step"]) for s in states}
    if len(micro) != 1:
        raise CheckpointError(f"the sampler states of one checkpoint disagree on the micro-step ({sorted(micro)}): "
                              "the checkpoint is damaged; delete it so that --resume uses the one before.")
    names = list(states[0]["cursor"])
    cursor = {n: max(int(s["cursor"].get(n, 0)) for s in states) for n in names}
    return {**states[0], "micro_step": micro.pop(), "cursor": cursor}


WINDOW_COUNTS = ("counts", "gate_sums")
"""The DES-MoE state entries that are per rank (the affinity window's routing counts, summed over the ranks
at the next affinity update); everything else in it is the same on every rank."""


def map_method(states: list, *, rank: int):
    """The method's state (desmoe.method ``state_dict``) for new rank ``rank``: rank 0's, with the window
    counts summed over the old ranks on new rank 0 and zero elsewhere (the all-reduce at the next update then
    gives the same totals). None (fft, lora) stays None."""
    first = states[0]
    if not isinstance(first, dict):
        return first
    out = dict(first)
    for key in WINDOW_COUNTS:
        if key in first:
            total = torch.stack([s[key] for s in states]).sum(dim=0)
            out[key] = total if rank == 0 else torch.zeros_like(total)
    return out


def rng_seed(seed: int, step: int, rank: int) -> int:
    """The seed of rank ``rank``'s RNG streams after a resume at ``step`` on another number of ranks."""
    digest = hashlib.sha256(f"desmoe-resume:{seed}:{step}:{rank}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1  # < 2**63: any torch / Python seed


def reseeded_rng_state(seed: int, step: int, rank: int) -> dict:
    """An RNG state (checkpoint.rng_state's form: torch, Python, CUDA) seeded from rng_seed(seed, step, rank);
    the RNGs of this process are left as they were."""
    s = rng_seed(seed, step, rank)
    python = random.getstate()
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    try:
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(s)  # the CPU generator and every CUDA device's
            random.seed(s)
            return checkpoint.rng_state()
    finally:
        random.setstate(python)


def describe(saved: Layout, *, step: int, world_size: int, ep_size: int) -> str:
    """The line rank 0 prints on a resume that changes the layout."""
    new = Layout(world_size, ep_size).describe()
    if saved.world_size == world_size:
        kept = "data order and RNG streams carried over (the same ranks)"
    else:
        kept = ("data order continues from the saved position, split over the new ranks; per-rank RNG streams "
                "re-seeded from (run.seed, step, rank)")
    return (f"resuming step {step} saved on {saved.describe()} on {new} through DeepSpeed's universal checkpoint: "
            f"weights and optimizer moments carried over exactly; {kept}")
