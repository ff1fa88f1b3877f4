"""desmoe.launch: CLI arguments, the run's config and directory, preflight, and the exit codes of one rank."""

import logging
import os

import pytest
import yaml

from desmoe import launch
from desmoe.checkpoint import CHECKPOINTS, MODEL_STATES, CheckpointError, state_file
from desmoe.config import ConfigError, dump_config, load_config
from desmoe.data import DataError
from desmoe.models import ModelError
from tests.conftest import tiny_config_dict


def _args(*argv):
    return launch.build_arg_parser().parse_args(list(argv))


def _problems(excinfo):
    return "\n".join(excinfo.value.problems)


@pytest.fixture
def cfg_path(tmp_path, write_yaml):
    """A tiny valid config whose run.output_dir is tmp_path/run (not created)."""
    return write_yaml(tiny_config_dict(tmp_path))


# ---- arguments ---------------------------------------------------------------------------------


def test_arg_parser_reads_flags_and_overrides():
    a = _args("--config", "c.yaml", "--output-dir", "out", "--stop-at-step", "5", "--local_rank=3",
              "train.max_steps=20", "method.mode=desmoe")
    assert (a.config, a.output_dir, a.resume, a.stop_at_step, a.local_rank) == ("c.yaml", "out", None, 5, 3)
    assert a.overrides == ["train.max_steps=20", "method.mode=desmoe"]
    b = _args("--resume", "runs/x", "--local-rank", "1")
    assert (b.config, b.resume, b.local_rank, b.stop_at_step, b.overrides) == (None, "runs/x", 1, None, [])


def test_arg_parser_rejects_a_non_integer_step_and_hides_local_rank(capsys):
    with pytest.raises(SystemExit) as e:
        _args("--stop-at-step", "soon")
    assert e.value.code == 2 and "--stop-at-step: invalid int value: 'soon'" in capsys.readouterr().err
    assert "local" not in launch.build_arg_parser().format_help()


# ---- a new run ---------------------------------------------------------------------------------


def test_resolve_config_without_config():
    with pytest.raises(ConfigError) as e:
        launch.resolve_config(_args(), world_size=1)
    assert _problems(e).startswith("--config: missing. Give the run YAML (e.g. --config configs/demo.yaml)")


@pytest.mark.parametrize("step", ["0", "-3"])
def test_resolve_config_refuses_a_stop_step_below_one(cfg_path, step):
    with pytest.raises(ConfigError) as e:
        launch.resolve_config(_args("--config", cfg_path, "--stop-at-step", step), world_size=1)
    assert _problems(e) == f"--stop-at-step: {step} must be >= 1."


def test_resolve_config_applies_overrides_and_output_dir(cfg_path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg, out = launch.resolve_config(_args("--config", cfg_path, "--output-dir", "elsewhere", "train.max_steps=9"),
                                     world_size=1)
    assert out == cfg.run.output_dir == str(tmp_path / "elsewhere")
    assert cfg.train.max_steps == 9
    cfg, out = launch.resolve_config(_args("--config", cfg_path, "--stop-at-step", "1"), world_size=1)
    assert out == str(tmp_path / "run")  # run.output_dir of the YAML
    assert os.listdir(tmp_path) == ["cfg.yaml"]  # nothing written


def test_resolve_config_defaults_to_runs_slash_name(tmp_path, write_yaml, monkeypatch):
    data = tiny_config_dict(tmp_path)
    del data["run"]["output_dir"]
    path = write_yaml(data)
    monkeypatch.chdir(tmp_path)
    cfg, out = launch.resolve_config(_args("--config", path), world_size=1)
    assert out == cfg.run.output_dir == str(tmp_path / "runs" / "t")


def test_resolve_config_checks_the_world_size(tmp_path, write_yaml, monkeypatch):
    path = write_yaml(tiny_config_dict(tmp_path, parallel={"ep_size": 2}))
    monkeypatch.setenv("WORLD_SIZE", "1")
    with pytest.raises(ConfigError) as e:
        launch.resolve_config(_args("--config", path))
    assert "parallel.ep_size: 2 does not divide the world size 1" in _problems(e)
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert launch.resolve_config(_args("--config", path))[0].parallel.ep_size == 2


def test_resolve_config_refuses_an_output_dir_that_is_a_file(cfg_path, tmp_path):
    (tmp_path / "taken").write_text("x")
    with pytest.raises(ConfigError) as e:
        launch.resolve_config(_args("--config", cfg_path, "--output-dir", str(tmp_path / "taken")), world_size=1)
    assert _problems(e).startswith(f"run.output_dir: '{tmp_path / 'taken'}' exists and is not a directory.")


@pytest.mark.parametrize("files", [["config.yaml"], ["metrics.jsonl"], ["config.yaml", "metrics.jsonl"]])
def test_resolve_config_refuses_a_dir_holding_a_run_unless_overwrite(cfg_path, tmp_path, files):
    run = tmp_path / "run"
    run.mkdir()
    for name in files:
        (run / name).write_text("")
    with pytest.raises(ConfigError) as e:
        launch.resolve_config(_args("--config", cfg_path), world_size=1)
    assert _problems(e) == (f"run.output_dir: {run} already holds a run ({', '.join(files)}). Choose a new "
                            "--output-dir, or set run.overwrite=true to replace it.")
    cfg, out = launch.resolve_config(_args("--config", cfg_path, "run.overwrite=true"), world_size=1)
    assert cfg.run.overwrite is True and out == str(run)


def test_an_empty_existing_dir_is_not_a_run(cfg_path, tmp_path):
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    assert launch.resolve_config(_args("--config", cfg_path), world_size=1)[1] == str(tmp_path / "run")


def test_demo_config_resolves_for_two_ranks(tmp_path):
    demo = os.path.join(os.path.dirname(__file__), "..", "..", "configs", "demo.yaml")
    cfg, out = launch.resolve_config(_args("--config", demo, "--output-dir", str(tmp_path / "demo")), world_size=2)
    assert out == str(tmp_path / "demo") and cfg.parallel.ep_size == 2 and cfg.method.mode == "fft"


# ---- --resume ----------------------------------------------------------------------------------


def _saved_run(base, *, step=None, max_steps=4):
    """base/run with config.yaml and, when ``step`` is given, a complete one-rank checkpoint of that step."""
    base.mkdir(exist_ok=True)
    yaml_path = base / "saved.yaml"
    yaml_path.write_text(yaml.safe_dump(tiny_config_dict(base, train={"max_steps": max_steps})))
    run = base / "run"
    run.mkdir()
    (run / "config.yaml").write_text(dump_config(load_config(str(yaml_path))))
    if step is not None:
        tag = run / CHECKPOINTS / f"step{step}"
        tag.mkdir(parents=True)
        (tag / MODEL_STATES).write_bytes(b"")
        open(state_file(str(tag), 0), "wb").close()
    return run


def test_resume_of_a_dir_without_config(tmp_path):
    with pytest.raises(ConfigError) as e:
        launch.resolve_config(_args("--resume", str(tmp_path)), world_size=1)
    assert _problems(e).startswith(f"--resume {tmp_path}: {tmp_path / 'config.yaml'} not found.")


def test_resume_refuses_config_and_another_output_dir(tmp_path):
    run = _saved_run(tmp_path, step=2)
    with pytest.raises(ConfigError) as e:
        launch.resolve_config(_args("--resume", str(run), "--config", "other.yaml"), world_size=1)
    assert _problems(e).startswith(f"--config other.yaml with --resume: a resumed run uses {run / 'config.yaml'}.")
    with pytest.raises(ConfigError) as e:
        launch.resolve_config(_args("--resume", str(run), "--output-dir", str(tmp_path / "x")), world_size=1)
    assert _problems(e).startswith(f"--output-dir {tmp_path / 'x'} with --resume {run}: a run continues in its "
                                   "own directory.")
    # the same directory, written another way, is fine
    cfg, out = launch.resolve_config(_args("--resume", str(run), "--output-dir", str(run) + "/."), world_size=1)
    assert out == str(run)


def test_resume_uses_the_saved_config_with_overrides(tmp_path, monkeypatch):
    run = _saved_run(tmp_path, step=2)
    monkeypatch.chdir(tmp_path)
    cfg, out = launch.resolve_config(_args("--resume", "run", "train.max_steps=6", "--stop-at-step", "3"),
                                     world_size=1)
    assert out == cfg.run.output_dir == str(run) and cfg.train.max_steps == 6


def test_resume_needs_steps_left_and_a_stop_after_the_checkpoint(tmp_path):
    run = _saved_run(tmp_path, step=4, max_steps=4)
    with pytest.raises(ConfigError) as e:
        launch.resolve_config(_args("--resume", str(run)), world_size=1)
    assert _problems(e) == (f"--resume {run}: its checkpoint step4 is at step 4, train.max_steps is 4: nothing "
                            "left to train.")
    with pytest.raises(ConfigError) as e:
        launch.resolve_config(_args("--resume", str(run), "train.max_steps=8", "--stop-at-step", "4"), world_size=1)
    assert _problems(e) == "--stop-at-step: 4 must be after the checkpoint's step 4."


def test_resume_without_a_checkpoint_or_for_another_world_size(tmp_path):
    run = _saved_run(tmp_path)
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        launch.resolve_config(_args("--resume", str(run)), world_size=1)
    saved = _saved_run(tmp_path / "b", step=1)
    # another world size resumes too (desmoe.reshard converts the checkpoint in the ranks)
    cfg, out = launch.resolve_config(_args("--resume", str(saved)), world_size=2)
    assert out == str(saved)
    os.remove(state_file(str(saved / CHECKPOINTS / "step1"), 0))
    with pytest.raises(CheckpointError, match=r"holds desmoe's state of rank\(s\) \[\]"):
        launch.resolve_config(_args("--resume", str(saved)), world_size=2)


# ---- preflight ---------------------------------------------------------------------------------


def test_preflight_reports_a_missing_model_and_missing_data(tmp_path, write_yaml):
    cfg = load_config(write_yaml(tiny_config_dict(tmp_path)))
    launch.preflight(cfg)  # builtin data, tiny model: nothing to find
    cfg.data.domains["math"].builtin, cfg.data.domains["math"].train = None, str(tmp_path / "none.jsonl")
    with pytest.raises(DataError, match="data.domains.math.train"):
        launch.preflight(cfg)
    cfg.model.path = str(tmp_path / "no-model")
    with pytest.raises(ModelError, match="is not a directory"):
        launch.preflight(cfg)  # the model is checked first


# ---- exit codes --------------------------------------------------------------------------------


def test_report_user_error_prints_on_rank_zero_only(monkeypatch, capsys):
    err = ConfigError(["train.lr: bad"])
    monkeypatch.delenv("RANK", raising=False)
    assert launch.report_user_error(err) == 2
    assert capsys.readouterr().err == f"desmoe: error: {err}\n"
    monkeypatch.setenv("RANK", "0")
    assert launch.report_user_error(err) == 2
    assert capsys.readouterr().err.count("desmoe: error:") == 1
    monkeypatch.setenv("RANK", "1")
    assert launch.report_user_error(err) == 2
    assert capsys.readouterr() == ("", "")


class FakeRun:
    def __init__(self):
        self.closed_with = []

    def close(self, status):
        self.closed_with.append(status)


class Rank:
    """setup / train / cleanup for run_rank; ``fail`` maps a stage to the exception it raises."""

    def __init__(self, **fail):
        self.fail, self.run, self.seen = fail, FakeRun(), []

    def setup(self, args):
        self.seen.append(("setup", args))
        self._maybe_fail("setup")
        return self.run

    def train(self, run):
        self.seen.append(("train", run))
        self._maybe_fail("train")

    def cleanup(self, run):
        self.seen.append(("cleanup", run))

    def _maybe_fail(self, stage):
        if stage in self.fail:
            raise self.fail[stage]

    def __call__(self, argv=("--config", "c.yaml", "train.max_steps=3")):
        return launch.run_rank(list(argv), self.setup, self.train, self.cleanup)

    @property
    def stages(self):
        return [s for s, _ in self.seen]


@pytest.fixture(autouse=True)
def rank_env(monkeypatch):
    """run_rank's dist.setup_env() and quiet_libraries() change process-wide state: undo it."""
    for name in ("DS_ACCELERATOR", "TORCH_EXTENSIONS_DIR"):
        monkeypatch.setenv(name, os.environ.get(name, "unset"))
        if os.environ[name] == "unset":
            monkeypatch.delenv(name)  # recorded: removed again after the test
    for name in ("RANK", "DESMOE_EXIT_CODE_DIR"):
        monkeypatch.delenv(name, raising=False)
    levels = {n: logging.getLogger(n).level for n in ("DeepSpeed", "deepspeed", "transformers", "torch.distributed")}
    yield
    for n, level in levels.items():
        logging.getLogger(n).setLevel(level)


def test_run_rank_finishes_with_zero(capsys):
    rank = Rank()
    assert rank() == 0
    assert rank.stages == ["setup", "train", "cleanup"]
    args = rank.seen[0][1]
    assert args.config == "c.yaml" and args.overrides == ["train.max_steps=3"]
    assert rank.seen[2][1] is rank.run and rank.run.closed_with == []
    assert logging.getLogger("DeepSpeed").level == logging.WARNING  # quiet_libraries ran
    assert capsys.readouterr() == ("", "")


@pytest.mark.parametrize("err", [ConfigError(["train.lr: bad"]), ModelError("no such model"),
                                 DataError("empty domain"), CheckpointError("damaged")])
def test_run_rank_turns_a_user_error_in_setup_into_two(err, capsys):
    rank = Rank(setup=err)
    assert rank() == 2
    assert rank.stages == ["setup"]
    assert capsys.readouterr().err == f"desmoe: error: {err}\n"


def test_run_rank_turns_a_user_error_in_train_into_two(capsys):
    rank = Rank(train=DataError("bad record"))
    assert rank() == 2
    assert rank.stages == ["setup", "train"]  # no cleanup
    assert rank.run.closed_with == ["FAILED"]  # metrics.jsonl, progress and the MLflow run are closed
    assert capsys.readouterr().err == "desmoe: error: bad record\n"


def test_run_rank_stopped_training_is_three_and_closes_the_run_as_failed(capsys, monkeypatch):
    rank = Rank(train=launch.TrainingStopped("5 non-finite steps in a row"))
    assert rank() == 3
    assert rank.stages == ["setup", "train"] and rank.run.closed_with == ["FAILED"]
    assert capsys.readouterr().err == "desmoe: stopped: 5 non-finite steps in a row\n"
    monkeypatch.setenv("RANK", "1")
    rank = Rank(train=launch.TrainingStopped("again"))
    assert rank() == 3 and rank.run.closed_with == ["FAILED"]
    assert capsys.readouterr().err == ""  # said once, by rank 0


def test_run_rank_under_the_launcher_writes_the_code_and_exits_zero(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DESMOE_EXIT_CODE_DIR", str(tmp_path))
    monkeypatch.setenv("RANK", "1")
    assert Rank(setup=ConfigError(["x: bad"]))() == 0
    assert (tmp_path / "rank1").read_text() == "2"
    assert capsys.readouterr().err == ""  # rank 1 does not repeat rank 0's message
    monkeypatch.setenv("RANK", "0")
    assert Rank(train=launch.TrainingStopped("stop"))() == 0
    assert (tmp_path / "rank0").read_text() == "3"
    os.remove(tmp_path / "rank0")
    os.remove(tmp_path / "rank1")
    assert Rank()() == 0
    assert os.listdir(tmp_path) == []  # a rank that finished writes no code


def test_run_rank_lets_a_crash_through_after_closing_the_run():
    rank = Rank(train=RuntimeError("boom"))
    with pytest.raises(RuntimeError, match="boom"):
        rank()
    assert rank.stages == ["setup", "train"] and rank.run.closed_with == ["FAILED"]
    rank = Rank(setup=RuntimeError("early"))
    with pytest.raises(RuntimeError, match="early"):
        rank()  # no run yet: nothing to close
    assert rank.run.closed_with == []


def test_run_rank_closes_an_interrupted_run_as_killed():
    rank = Rank(train=KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):
        rank()
    assert rank.run.closed_with == ["KILLED"]


def test_options_and_overrides_in_any_order():
    args = launch.parse_args(["--config", "c.yaml", "train.lr=1e-3", "--stop-at-step", "4", "data.seq_len=64"])
    assert args.config == "c.yaml" and args.stop_at_step == 4
    assert args.overrides == ["train.lr=1e-3", "data.seq_len=64"]
    args = launch.parse_args(["train.max_steps=6", "--local_rank=1", "--output-dir", "out", "run.seed=3"])
    assert args.local_rank == 1 and args.output_dir == "out" and args.overrides == ["train.max_steps=6", "run.seed=3"]
