"""The one place that touches torch.distributed and DeepSpeed process groups.

Everything else asks this module for (world size, rank) and for the few collectives the
recipe needs; without a launcher it answers (1, 0).
"""

from __future__ import annotations

import datetime
import os
import socket

import torch


def setup_env() -> None:
    """Process-wide settings that must precede ``import deepspeed``.

    - ``DS_ACCELERATOR=cpu`` when no CUDA device is visible (DeepSpeed otherwise probes for one).
    - ``TORCH_EXTENSIONS_DIR`` inside the project checkout (``.cache/torch_extensions``), so
      DeepSpeed's JIT-compiled ops are cached with the project, not in the home directory.
    """
    if "DS_ACCELERATOR" not in os.environ and not torch.cuda.is_available():
        os.environ["DS_ACCELERATOR"] = "cpu"
    if "TORCH_EXTENSIONS_DIR" not in os.environ:
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        if os.path.isfile(os.path.join(root, "pyproject.toml")) and os.access(root, os.W_OK):
            os.environ["TORCH_EXTENSIONS_DIR"] = os.path.join(root, ".cache", "torch_extensions")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(backend: str = "auto", timeout_s: int = 1800) -> None:
    """Join the process group the launcher described (torchrun / deepspeed), or form a group of one.

    A collective that waits longer than ``timeout_s`` for another rank raises instead of hanging."""
    import deepspeed

    if "RANK" not in os.environ:
        # NOTE: started without a launcher: a group of one, so the same code path runs.
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False,
                               timeout=datetime.timedelta(seconds=timeout_s))


def apply_timeout(timeout_s: int) -> None:
    """Give every process group of this rank (DeepSpeed's expert-parallel groups included, which
    ``new_group`` creates with the 30-minute default) the collective timeout ``timeout_s``."""
    if not is_initialized():
        return
    from torch.distributed import distributed_c10d as c10d

    # NOTE: _set_pg_timeout and the pg map are private torch APIs (torch 2.13 pinned); a torch without
    # them keeps the default timeouts of the groups DeepSpeed made.
    pg_map = getattr(getattr(c10d, "_world", None), "pg_map", {})
    failed = []
    for group in list(pg_map):
        try:
            c10d._set_pg_timeout(datetime.timedelta(seconds=timeout_s), group)
        except (AttributeError, ValueError, RuntimeError) as e:
            failed.append(str(e))
    if failed and get_world_size_and_rank()[1] == 0:
        print(f"desmoe: warning: parallel.timeout_s could not be applied to {len(failed)} process group(s) "
              f"({failed[0]}); they keep torch's default timeout.", flush=True)


def is_initialized() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def get_world_size_and_rank() -> tuple[int, int]:
    if is_initialized():
        return torch.distributed.get_world_size(), torch.distributed.get_rank()
    return 1, 0


def barrier() -> None:
    if is_initialized():
        torch.distributed.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum a small CPU/GPU tensor over every rank (in place) and return it.

    NOTE: the recipe's bookkeeping tensors live on the host; NCCL reduces device tensors only,
    so under NCCL a host tensor makes a round trip through the current GPU.
    """
    if is_initialized() and torch.distributed.get_world_size() > 1:
        if t.device.type == "cpu" and torch.distributed.get_backend() == "nccl":
            buf = t.cuda()
            torch.distributed.all_reduce(buf, op=torch.distributed.ReduceOp.SUM)
            t.copy_(buf.cpu())
        else:
            torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM)
    return t


def broadcast_object(obj, src: int = 0):
    if not is_initialized() or torch.distributed.get_world_size() == 1:
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_objects(obj) -> list:
    if not is_initialized() or torch.distributed.get_world_size() == 1:
        return [obj]
    out = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(out, obj)
    return out


def all_to_all_single(output: torch.Tensor, input: torch.Tensor, output_splits: list[int] | None = None,
                      input_splits: list[int] | None = None, group=None) -> torch.Tensor:
    """``torch.distributed.all_to_all_single`` over ``group`` (None: every rank); without a process group
    (a run of one) ``output`` is ``input``'s copy. Returns ``output``."""
    if not is_initialized():
        return output.copy_(input)
    torch.distributed.all_to_all_single(output, input, output_splits, input_splits, group=group)
    return output


def destroy() -> None:
    if is_initialized():
        torch.distributed.destroy_process_group()
