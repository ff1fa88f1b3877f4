"""benchmarks/discovery_train.py's data: the two arms see the same training records; eval records never train."""

import json

from benchmarks import discovery_train as dt
from desmoe.config import config_from_dict, validate


def test_both_arms_train_on_the_same_records_and_never_on_the_eval_ones(tmp_path):
    domains = ["math", "intent"]
    files = dt.write_data(str(tmp_path), domains, {"math": 40, "intent": 30})
    read = lambda p: [json.loads(line) for line in open(p)]  # noqa: E731
    unlabelled = read(files["unlabelled"])
    for d in domains:
        train, held = read(files["train"][d]), read(files["eval"][d])
        assert len(train) + len(held) == {"math": 40, "intent": 30}[d] and len(held) == int(len(train + held) * 0.15)
        assert not {r["text"] for r in train} & {r["text"] for r in held}
        assert sorted(r["text"] for r in unlabelled if r["true_domain"] == d) == sorted(r["text"] for r in train)
    assert "domain" not in unlabelled[0] and [r["true_domain"] for r in unlabelled] != sorted(
        r["true_domain"] for r in unlabelled)  # shuffled: file order does not give the domains away
    again = dt.write_data(str(tmp_path / "again"), domains, {"math": 40, "intent": 30})
    assert read(again["unlabelled"]) == unlabelled  # the same split and order every time


def test_arm_configs_differ_only_in_where_the_domains_come_from(tmp_path):
    domains = ["math", "intent"]
    files = dt.write_data(str(tmp_path), domains, {"math": 40, "intent": 30})
    base = {"run": {"name": "x", "output_dir": str(tmp_path / "run")}, "model": {"tiny": {"model_type": "qwen3_moe"}},
            "train": {"max_steps": 2}, "data": {"seq_len": 32, "domains": {d: {"builtin": d} for d in domains}},
            "method": {"mode": "desmoe"}, "eval": {"every": 5}, "checkpoint": {"save_final": False}}
    lab = dt.arm_config(base, files, domains, "labelled", clusters=2)
    dis = dt.arm_config(base, files, domains, "discovered_t16", clusters=2)
    assert lab["data"]["domains"]["math"] == {"train": files["train"]["math"], "eval": files["eval"]["math"],
                                              "format": "text"}
    assert "domains" not in dis["data"] and dis["data"]["train"] == files["unlabelled"]
    assert dis["data"]["discover"] == {"clusters": 2, "features": "share", "format": "text", "max_tokens": 16}
    for cfg in (lab, dis):
        assert cfg["eval"]["every"] == 0 and cfg["checkpoint"]["save_final"] is True
        validate(config_from_dict(cfg))
    strip = lambda c: {k: v for k, v in c.items() if k != "data"}  # noqa: E731
    assert strip(lab) == strip(dis)
