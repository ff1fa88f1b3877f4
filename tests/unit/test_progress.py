"""The progress display: plain lines in a log, a tqdm bar on a terminal."""

import io

from desmoe.progress import Progress, format_eta


class FakeTTY(io.StringIO):
    def isatty(self):
        return True


LOSSES = {"math": 1.23456, "code": 2.5}


def test_plain_lines_every_n_steps_and_at_the_end():
    out = io.StringIO()
    p = Progress(10, every=4, stream=out)
    for step in range(1, 11):
        p.update(step, phase="warmup", losses=LOSSES, lr=2e-3, tokens_per_s=9000.0)
    p.write("phase: stabilization")
    p.close()
    lines = out.getvalue().splitlines()
    assert [l.split(" |")[0] for l in lines[:3]] == ["step 4/10", "step 8/10", "step 10/10"]
    assert lines[0].startswith("step 4/10 | warmup | loss math 1.2346, code 2.5000 | lr 2.00e-03 | 9,000 tok/s | eta ")
    assert lines[2].endswith("eta 0s")
    assert lines[3] == "phase: stabilization"
    assert "\r" not in out.getvalue()  # no bar control characters in a log file


def test_plain_lines_of_a_resumed_run_count_from_its_start():
    out = io.StringIO()
    p = Progress(100, start_step=90, every=5, stream=out)
    p.update(95, phase="consolidation", losses={"math": 1.0}, lr=1e-4, tokens_per_s=10.0)
    assert out.getvalue().startswith("step 95/100 | consolidation |")


def test_terminal_gets_a_bar_with_postfix_and_messages_above_it():
    out = FakeTTY()
    p = Progress(300, start_step=100, every=50, stream=out)
    assert p.bar is not None and p.bar.n == 100  # resumed: the bar starts at the resumed step
    p.update(101, phase="warmup", losses=LOSSES, lr=2e-3, tokens_per_s=9000.0)
    p.write("checkpoint saved")
    p.update(150, phase="stabilization", losses=LOSSES, lr=2e-3, tokens_per_s=9000.0)
    p.close()
    text = out.getvalue()
    assert "150/300" in text
    assert "stabilization | math 1.235 code 2.500 | lr 2.0e-03 | 9.0k tok/s" in text
    assert "checkpoint saved\n" in text
    assert "step 150/300 |" not in text  # no plain lines on a terminal
    p.update(151, phase="x", losses={}, lr=0.0, tokens_per_s=0.0)  # after close: nothing
    assert out.getvalue() == text


def test_eta_format():
    assert [format_eta(s) for s in (0, 40.4, 725, 10920)] == ["0s", "40s", "12m05s", "3h02m"]
