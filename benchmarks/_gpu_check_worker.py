"""Worker of benchmarks/gpu_check.py: one measurement per call, written to <OUT_DIR>/.

    torchrun ... benchmarks/_gpu_check_worker.py isolation OUT_DIR CONFIG [overrides ...]
    torchrun ... benchmarks/_gpu_check_worker.py step_time OUT_DIR CONFIG STEPS WARMUP MODES [overrides ...]
    python       benchmarks/_gpu_check_worker.py mfu OUT_DIR CONFIG STEPS WARMUP [overrides ...]

- ``isolation``: a desmoe-mode run through the real recipe; after every optimizer step the rows frozen
  for it and checksums of every parameter (per row for fused expert tensors), recorded as
  tests/integration/method_worker.py records them, so gpu_check.py judges them with the test suite's
  own assertions. Writes isolation_rank<R>.json.
- ``step_time``: the real recipe (one run per mode of MODES, comma-separated) and a bare
  forward -> backward -> step loop on the same batches; tokens/s and peak device memory of each.
  Writes result.json (rank 0).
- ``mfu``: forward -> backward -> step of random tokens through desmoe's engine (build_engine; every
  parameter trains); tokens/s, peak memory, and the model's shape for the FLOPs count. Writes result.json.
"""

import gc
import json
import os
import sys
import time

from desmoe import dist

dist.setup_env()

import torch  # noqa: E402

from desmoe.constants import IGNORE_INDEX  # noqa: E402
from desmoe.data import DomainSampler  # noqa: E402
from desmoe.engine import build_ds_config, build_engine  # noqa: E402
from desmoe.launch import build_arg_parser, exit_without_finalization, quiet_libraries  # noqa: E402
from desmoe.train import build_model, cleanup, setup, train  # noqa: E402

MFU_CONFIG_KEYS = ("model_type", "vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size",
                   "num_hidden_layers", "first_k_dense_replace", "n_routed_experts", "n_shared_experts",
                   "num_experts_per_tok", "num_attention_heads", "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim",
                   "qk_rope_head_dim", "v_head_dim")
"""The HF config keys the FLOPs count reads (benchmarks/gpu_check.py: compute_active_matmul_params)."""


def _write_json(out_dir: str, name: str, data: dict) -> None:
    with open(os.path.join(out_dir, name), "w") as f:
        json.dump(data, f)


def _cuda() -> bool:
    return torch.cuda.is_available()


def _reset_peak() -> None:
    if _cuda():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def _peak_mib() -> float | None:
    """Peak memory allocated on this rank's GPU since the last _reset_peak (MiB); None on CPU."""
    if not _cuda():
        return None
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / 2**20


def _allocated_mib() -> float | None:
    return torch.cuda.memory_allocated() / 2**20 if _cuda() else None


def _free_device_memory() -> None:
    gc.collect()
    if _cuda():
        torch.cuda.empty_cache()


# ---- isolation -------------------------------------------------------------------------------


def isolation(out_dir: str, config: str, overrides: list[str]) -> None:
    # NOTE: the per-step record is the test suite's (tests/integration/method_worker.py) so the judgement can be
    # its assertions too; that worker's own main also compares step-0 logits with a CPU fp32 reference model,
    # which a bf16 engine on a GPU cannot be fed as is.
    from tests.integration.method_worker import snapshot

    args = build_arg_parser().parse_args(["--config", config, "--output-dir", os.path.join(out_dir, "run"),
                                          *overrides])
    run = setup(args)
    engine, method = run.engine, run.method
    steps = [{"step": 0, "params": snapshot(engine, method)}]
    end_step = method.end_step

    def recording_end_step(step):
        frozen = {str(k): v.int().tolist() for k, v in (method._frozen or {}).items()}
        steps.append({"step": step, "phase": method.phase, "frozen": frozen, "params": snapshot(engine, method)})
        return end_step(step)

    method.end_step = recording_end_step
    train(run)
    expert_ids = {id(ep.param) for ep in method.expert_params}
    names = [n for n, _ in engine.module.named_parameters()]
    expert_names = sorted(n for n, p in engine.module.named_parameters() if id(p) in expert_ids)
    kinds = {n: ("expert" if n in expert_names else "router" if (".router." in n or "adaptive_router" in n)
                 else "shared" if ".shared_expert" in n else "backbone") for n in names}
    _write_json(out_dir, f"isolation_rank{run.rank}.json", {
        "steps": steps, "kinds": kinds, "moe_layers": method.moe_layers,
        "expert_param_layer": {n: int(n.split(".")[2]) for n in expert_names},
        "ep_rank": method.expert_params[0].ep_rank, "num_local": method.expert_params[0].num_local,
        "expert_dtype": str(method.expert_params[0].param.dtype).replace("torch.", ""),
        "world_size": run.world_size, "ep_size": run.cfg.parallel.ep_size,
        "device": str(method.expert_params[0].param.device)})
    cleanup(run)


# ---- step time -------------------------------------------------------------------------------


def bare_loop(cfg, ds_config, batches, warmup: int) -> float:
    """forward -> backward -> step on pre-sampled batches already on the device; tokens/s after warm-up.

    NOTE: benchmarks/_step_time_worker.py's bare loop hands the engine the sampler's host tensors, which a GPU
    engine does not move (CPU only); here the batches are moved before timing and their tokens counted on the
    host, so counting adds no device sync."""
    engine = build_engine(build_model(cfg), ds_config, cfg.train)
    dev = next(engine.module.parameters()).device
    on_device = [(ids.to(dev), labels.to(dev), int((labels != IGNORE_INDEX).sum())) for ids, labels in batches]
    tokens, t0 = 0, time.perf_counter()
    for i, (ids, labels, n) in enumerate(on_device):
        if i == warmup:
            if _cuda():
                torch.cuda.synchronize()
            dist.barrier()
            t0, tokens = time.perf_counter(), 0
        out = engine(input_ids=ids, labels=labels)
        engine.backward(out.loss)
        engine.step()
        tokens += n
    if _cuda():
        torch.cuda.synchronize()
    dist.barrier()
    total = torch.tensor([float(tokens)])
    dist.all_reduce_sum(total)
    tps = float(total) / (time.perf_counter() - t0)
    del engine, on_device
    return tps


def _recipe(out_dir, config, steps, warmup, mode, overrides):
    """One recipe run in ``mode``: (its tokens/s after warm-up, run)."""
    from benchmarks._step_time_worker import recipe_loop

    run, tps = recipe_loop(out_dir, config, steps, [*overrides, f"method.mode={mode}"], warmup, mode)
    run.close("FINISHED")
    return tps, run


def step_time(out_dir: str, config: str, steps: int, warmup: int, modes: list[str], overrides: list[str]) -> None:
    """The recipe in each mode of ``modes`` and the bare loop, right after the first mode's run (so that pair
    meets the same machine state), on the batches that run drew."""
    res: dict = {"steps_timed": steps - warmup, "loops": {}}
    for i, mode in enumerate(modes):
        _free_device_memory()
        base = _allocated_mib()
        _reset_peak()
        tps, run = _recipe(out_dir, config, steps, warmup, mode, overrides)
        res["loops"][f"recipe_{mode}"] = {"tokens_per_s": tps, "peak_mib": _peak_mib(), "allocated_before_mib": base}
        if i == 0:
            # the batches the recipe drew on this rank, replayed by the bare loop (as benchmarks/step_time.py does)
            sampler = DomainSampler(run.domains, micro_batch_size=run.cfg.train.micro_batch_size,
                                    seed=run.cfg.run.seed, rank=run.rank, world_size=run.world_size)
            batches = [sampler.next_batch()[1:] for _ in range(steps * run.cfg.train.grad_accum_steps)]
            res.update(world_size=run.world_size, ep_size=run.cfg.parallel.ep_size,
                       micro_batch_size=run.cfg.train.micro_batch_size, seq_len=run.cfg.data.seq_len,
                       bf16=bool(run.ds_config.get("bf16", {}).get("enabled")))
            cfg, ds_config, master = run.cfg, run.ds_config, run.master
            del run
            _free_device_memory()
            base = _allocated_mib()
            _reset_peak()
            tps = bare_loop(cfg, ds_config, batches, warmup * cfg.train.grad_accum_steps)
            res["loops"]["bare"] = {"tokens_per_s": tps, "peak_mib": _peak_mib(), "allocated_before_mib": base}
        else:
            del run
    if master:
        _write_json(out_dir, "result.json", res)
    dist.destroy()


# ---- MFU -------------------------------------------------------------------------------------


def mfu(out_dir: str, config: str, steps: int, warmup: int, overrides: list[str]) -> None:
    from desmoe.config import load_config
    from desmoe.models import build_tiny_model, get_family

    cfg = load_config(config, overrides)
    dist.init_distributed(cfg.parallel.backend, cfg.parallel.timeout_s)
    t_build = time.perf_counter()
    model = build_tiny_model(cfg.model.tiny, seed=cfg.run.seed)
    mc = model.config
    params_total = sum(p.numel() for p in model.parameters())
    engine = build_engine(model, build_ds_config(cfg, get_family(mc.model_type), mc), cfg.train)
    del model
    build_s = time.perf_counter() - t_build
    dev = next(engine.module.parameters()).device
    gen = torch.Generator(device=dev).manual_seed(cfg.run.seed)
    shape = (cfg.train.micro_batch_size, cfg.data.seq_len)
    batches = [torch.randint(mc.vocab_size, shape, device=dev, generator=gen) for _ in range(2)]
    losses = []
    _reset_peak()
    t0 = time.perf_counter()
    for i in range(warmup + steps):
        if i == warmup:
            if _cuda():
                torch.cuda.synchronize()
            t0 = time.perf_counter()
        ids = batches[i % 2]
        out = engine(input_ids=ids, labels=ids)
        engine.backward(out.loss)
        engine.step()
        losses.append(out.loss.detach())
    if _cuda():
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - t0
    # labels = input ids: the loss counts seq_len - 1 tokens of a row, the model computes seq_len
    tokens = steps * shape[0] * shape[1]
    _write_json(out_dir, "result.json", {
        "tokens_per_s": tokens / elapsed, "step_time_s": elapsed / steps, "steps_timed": steps,
        "micro_batch_size": shape[0], "seq_len": shape[1], "peak_mib": _peak_mib(), "build_s": build_s,
        "params_total": params_total, "loss_first": float(losses[0]), "loss_last": float(losses[-1]),
        "device_name": torch.cuda.get_device_name(dev) if _cuda() else "cpu",
        "param_dtype": str(next(engine.module.parameters()).dtype).replace("torch.", ""),
        "model_config": {k: getattr(mc, k, None) for k in MFU_CONFIG_KEYS}})
    dist.destroy()


def main(argv: list[str]) -> None:
    quiet_libraries()
    what, out_dir, config, *rest = argv
    if what == "isolation":
        isolation(out_dir, config, rest)
    elif what == "step_time":
        steps, warmup, modes, *overrides = rest
        step_time(out_dir, config, int(steps), int(warmup), modes.split(","), overrides)
    elif what == "mfu":
        steps, warmup, *overrides = rest
        mfu(out_dir, config, int(steps), int(warmup), overrides)
    else:
        raise SystemExit(f"_gpu_check_worker: unknown measurement {what!r} (isolation, step_time, mfu)")


if __name__ == "__main__":
    main(sys.argv[1:])
    # NOTE: as the recipe does: gloo's threads can abort interpreter finalization (pytorch/pytorch#190489)
    exit_without_finalization(0)
