import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(ROOT, "configs")


def tiny_config_dict(tmp_path, **sections) -> dict:
    """A minimal valid run config (tiny qwen3_moe, one builtin domain) as a plain mapping."""
    cfg = {
        "run": {"name": "t", "output_dir": str(tmp_path / "run")},
        "model": {"tiny": {"model_type": "qwen3_moe"}},
        "train": {"max_steps": 2, "micro_batch_size": 2},
        "data": {"seq_len": 32, "domains": {"math": {"builtin": "math"}}},
    }
    for k, v in sections.items():
        cfg.setdefault(k, {}).update(v)
    return cfg


@pytest.fixture
def write_yaml(tmp_path):
    import yaml

    def write(data, name="cfg.yaml"):
        path = tmp_path / name
        path.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data)
        return str(path)

    return write


@pytest.fixture
def python():
    return sys.executable
