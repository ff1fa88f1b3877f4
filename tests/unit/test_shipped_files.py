"""Every shipped YAML and DeepSpeed JSON loads, and every YAML starts with the command that runs it."""

import glob
import json
import os

import pytest

from desmoe.config import load_config
from desmoe.engine import build_ds_config
from desmoe.models import build_tiny_model, get_family
from tests.conftest import CONFIGS, ROOT

YAMLS = sorted(glob.glob(os.path.join(CONFIGS, "*.yaml")))
JSONS = sorted(glob.glob(os.path.join(ROOT, "ds_configs", "*.json")))


def test_there_is_something_to_check():
    assert YAMLS and len(JSONS) >= 2


@pytest.mark.parametrize("path", YAMLS, ids=os.path.basename)
def test_yaml_loads_and_starts_with_its_command(path):
    cfg = load_config(path)
    first = open(path, encoding="utf-8").readline()
    assert first.startswith("# ") and f"--config configs/{os.path.basename(path)}" in first


@pytest.mark.parametrize("path", JSONS, ids=os.path.basename)
def test_ds_json_loads_and_combines_with_a_run_config(path):
    with open(path, encoding="utf-8") as f:
        json.load(f)
    cfg = load_config(YAMLS[0], [f"parallel.ds_config={path}"])
    model = build_tiny_model(cfg.model.tiny, seed=0)
    ds = build_ds_config(cfg, get_family(model.config.model_type), model.config)
    assert ds["expert_parallel"]["autoep_size"] == cfg.parallel.ep_size


def test_the_demo_halves_differ_only_in_the_method():
    """make demo compares fft and desmoe: the same base model, data, steps, LR and evaluation."""
    fft = load_config(os.path.join(CONFIGS, "demo_fft.yaml")).to_dict()
    des = load_config(os.path.join(CONFIGS, "demo_desmoe.yaml")).to_dict()
    assert (fft["method"]["mode"], des["method"]["mode"]) == ("fft", "desmoe")
    assert des["method"] == {**fft["method"], "mode": "desmoe"}  # every other method key at its default
    for cfg in (fft, des):
        del cfg["method"], cfg["run"]["name"], cfg["run"]["output_dir"]
    assert fft == des
    assert fft["model"]["path"].endswith(os.path.join(".cache", "desmoe", "base_models", "full"))


def test_many_domains_config_trains_every_built_in_sub_domain_in_order():
    from desmoe.data import MANY_DOMAINS

    cfg = load_config(os.path.join(CONFIGS, "many_domains.yaml"))
    assert tuple(cfg.data.domains) == MANY_DOMAINS
    assert all(d.builtin == name and d.max_examples for name, d in cfg.data.domains.items())
    assert cfg.method.mode == "desmoe" and cfg.model.tiny["num_experts"] == 16
