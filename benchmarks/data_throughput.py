"""Data loader throughput against the training step's consumption, on the demo config.

    python benchmarks/data_throughput.py [--config configs/demo.yaml] [--steps 200] [overrides ...]

Measures, in this process: (1) reading + tokenising + packing every domain before step 1
(tokens/s), and (2) the sampler drawing packed micro-batches during training (tokens/s, one
rank). (2) is what training waits on, so it is compared with the tokens/s one rank consumes
(``--train-tokens-per-s`` over ``--world-size`` ranks; the default is the recipe's figure from
`make bench` on the 2-core machine). The loader must never be the bottleneck: ratio >= 10.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks._common import ROOT  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=os.path.join(ROOT, "configs", "demo.yaml"))
    p.add_argument("--steps", type=int, default=2000, help="micro-batches drawn from the sampler")
    p.add_argument("--train-tokens-per-s", type=float, default=9024.0,
                   help="tokens/s the recipe consumes over all ranks (make bench; 2 ranks on the 2-core machine)")
    p.add_argument("--world-size", type=int, default=2)
    p.add_argument("overrides", nargs="*")
    a = p.parse_args()

    from desmoe.config import load_config
    from desmoe.data import DomainSampler, build_domain_data, build_tokenizer

    cfg = load_config(a.config, a.overrides)
    tokenizer = build_tokenizer(cfg.data, cfg.model)
    t0 = time.perf_counter()
    domains, _ = build_domain_data(cfg.data, tokenizer)
    build_s = time.perf_counter() - t0
    tokens = sum(d.tokens for d in domains.values())

    sampler = DomainSampler(domains, micro_batch_size=cfg.train.micro_batch_size, seed=cfg.run.seed, rank=0,
                            world_size=a.world_size)
    t0 = time.perf_counter()
    drawn = 0
    for _ in range(a.steps):
        _, ids, _ = sampler.next_batch()
        drawn += ids.numel()
    sample_s = time.perf_counter() - t0
    per_rank_need = a.train_tokens_per_s / a.world_size
    print(f"read + tokenise + pack: {tokens:,} tokens in {build_s:.2f} s -> {tokens / build_s:,.0f} tokens/s")
    print(f"sampler: {drawn:,} tokens in {sample_s:.3f} s -> {drawn / sample_s:,.0f} tokens/s (one rank)")
    print(f"training consumes {per_rank_need:,.0f} tokens/s per rank -> sampler / consumption = "
          f"{drawn / sample_s / per_rank_need:,.1f}x (target >= 10x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
