"""Rank 0's progress display: a tqdm bar on a terminal, plain lines in a log file.

    progress = Progress(total=cfg.train.max_steps, start_step=resumed_step, every=cfg.train.log_every)
    progress.update(step, phase="warmup", losses={"math": 1.23, "code": 2.5}, lr=2e-3, tokens_per_s=9000.0)
    progress.write("phase: stabilization from step 61")    # a message that leaves the bar intact
    progress.close()

On a terminal (``stream.isatty()``) the bar counts optimizer steps (``initial`` = the resumed
step, so the rate and tqdm's ETA cover only this job's steps) and its postfix shows the phase,
each domain's loss, the learning rate and tokens/s. Anywhere else (a SLURM log, a pipe) every
``every``-th step and the last one print one line:

    step 50/300 | warmup | loss math 1.2345, code 2.3456 | lr 2.00e-03 | 9,000 tok/s | eta 40s
"""

from __future__ import annotations

import sys
import time
import typing


def format_eta(seconds: float) -> str:
    """40s, 12m05s, 3h02m."""
    s = max(0, round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def format_line(step: int, total: int, phase: str, losses: dict[str, float], lr: float, tokens_per_s: float,
                eta_s: float) -> str:
    """The plain progress line (no terminal)."""
    loss = ", ".join(f"{name} {value:.4f}" for name, value in losses.items())
    return (f"step {step}/{total} | {phase} | loss {loss} | lr {lr:.2e} | {tokens_per_s:,.0f} tok/s | "
            f"eta {format_eta(eta_s)}")


def format_postfix(phase: str, losses: dict[str, float], lr: float, tokens_per_s: float) -> str:
    """The bar's postfix: short numbers, tqdm adds the count, rate and ETA."""
    loss = " ".join(f"{name} {value:.3f}" for name, value in losses.items())
    rate = f"{tokens_per_s / 1000:.1f}k" if tokens_per_s >= 1000 else f"{tokens_per_s:.0f}"
    return f"{phase} | {loss} | lr {lr:.1e} | {rate} tok/s"


class Progress:
    """Training progress on ``stream`` (stdout by default); use on rank 0 only."""

    def __init__(self, total: int, *, start_step: int = 0, every: int = 1, stream: typing.TextIO | None = None):
        self.total, self.start_step, self.every = total, start_step, max(1, every)
        self.stream = stream if stream is not None else sys.stdout
        self._t0 = time.perf_counter()
        self.bar = None
        self.closed = False
        isatty = getattr(self.stream, "isatty", None)
        if isatty is not None and isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=start_step, file=self.stream, unit="step", dynamic_ncols=True,
                            mininterval=0.5, smoothing=0.1)

    def update(self, step: int, *, phase: str, losses: dict[str, float], lr: float, tokens_per_s: float) -> None:
        """Step ``step`` (1-based, optimizer steps) is done; ``losses`` maps domain -> mean task loss."""
        if self.closed:
            return
        if self.bar is not None:
            self.bar.set_postfix_str(format_postfix(phase, losses, lr, tokens_per_s), refresh=False)
            self.bar.update(step - self.bar.n)
            return
        if step % self.every == 0 or step == self.total:
            done = step - self.start_step
            eta = (time.perf_counter() - self._t0) / done * (self.total - step) if done > 0 else 0.0
            self.write(format_line(step, self.total, phase, losses, lr, tokens_per_s, eta))

    def write(self, msg: str) -> None:
        """Print a message above the bar (or as a plain line)."""
        if self.bar is not None:
            self.bar.write(msg, file=self.stream)
        else:
            print(msg, file=self.stream, flush=True)

    def close(self) -> None:
        """Leave the bar's final state on screen; later updates do nothing, write() prints plain lines."""
        self.closed = True
        if self.bar is not None:
            self.bar.close()
            self.bar = None
