"""Bad input: huge records read in bounded memory, unknown formats, domains missing on either side."""

import io
import json
import subprocess
import sys
import textwrap

import pytest

from desmoe.config import DataSection, DomainSection
from desmoe.data import DataError, example_text, load_domain_examples, read_jsonl, read_lines, record_segments

MiB = 1 << 20


def _data(domains, **kw):
    return DataSection(domains={k: DomainSection(**v) for k, v in domains.items()}, **kw)


@pytest.fixture(scope="module")
def huge_line_file(tmp_path_factory):
    """A jsonl file whose second line is one 100 MB record, between two good ones (written in 1 MiB blocks)."""
    path = tmp_path_factory.mktemp("huge") / "d.jsonl"
    with open(path, "wb") as f:
        f.write(b'{"text": "before"}\n{"text": "')
        block = b"a" * MiB
        for _ in range(100):
            f.write(block)
        f.write(b'"}\n{"text": "after"}\n')
    return str(path)


def test_read_lines_across_chunk_boundaries():
    data = b'ab\n\ncdefgh\nijklmnopqrstu\nxyz'
    got = list(read_lines(io.BytesIO(data), max_bytes=8, chunk_size=3))
    assert got == [(1, b"ab"), (2, b""), (3, b"cdefgh"), (4, None), (5, b"xyz")]
    assert list(read_lines(io.BytesIO(b"a\n"), max_bytes=8)) == [(1, b"a")]
    assert list(read_lines(io.BytesIO(b""), max_bytes=8)) == []


def test_a_huge_line_is_an_error_naming_file_line_and_limit(huge_line_file):
    with pytest.raises(DataError, match=r"d\.jsonl:2: record longer than data\.max_record_bytes \(16777216 bytes\)\. "
                                        r"Raise the limit \(e\.g\. data\.max_record_bytes=67108864\)"):
        load_domain_examples(_data({"d": {"train": huge_line_file}}))


def test_a_huge_line_is_skipped_and_counted(huge_line_file):
    examples, report = load_domain_examples(_data({"d": {"train": huge_line_file}}, on_bad_record="skip"))
    assert [example_text(e) for e in examples["d"]] == ["before", "after"]
    assert report["d"].skipped == 1 and "d.jsonl:2: record longer than" in report["d"].first_skip
    # and a raised limit reads it
    examples, _ = load_domain_examples(_data({"d": {"train": huge_line_file}}, max_record_bytes=128 * MiB))
    assert len(example_text(examples["d"][1])) == 100 * MiB


def test_reading_is_memory_bounded(huge_line_file, tmp_path):
    """A 200 MB file of 64 KB records and the 100 MB line, read in a fresh process: peak RSS grows by far less."""
    big = tmp_path / "big.jsonl"
    line = json.dumps({"text": "x" * (64 * 1024 - 16)}).encode() + b"\n"
    block = line * (MiB // len(line) + 1)
    with open(big, "wb") as f:
        while f.tell() < 200 * MiB:
            f.write(block)
    n_lines = big.stat().st_size // len(line)
    child = textwrap.dedent(f"""
        import resource
        from desmoe.data import read_jsonl
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        n = sum(1 for _ in read_jsonl({str(big)!r}, key="k"))
        skipped = []
        m = sum(1 for _ in read_jsonl({huge_line_file!r}, key="k", on_bad_line=skipped.append))
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print(n, m, len(skipped), (after - before) // 1024)
    """)
    out = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    n, m, skipped, growth_mb = map(int, out.stdout.split())
    assert (n, m, skipped) == (n_lines, 2, 1)
    assert growth_mb < 40, f"peak RSS grew by {growth_mb} MB reading 200 MB and a 100 MB line"


def test_unknown_file_type_and_record_format(tmp_path):
    csv = tmp_path / "d.csv"
    csv.write_text("text\nhello\n")
    with pytest.raises(DataError, match=r"data\.domains\.d\.train: '.*d\.csv' is not a file type desmoe reads"):
        load_domain_examples(_data({"d": {"train": str(csv)}}))
    with pytest.raises(DataError, match=r"x:1: unknown record format 'csv'"):
        record_segments({"text": "t"}, "csv", "x:1")
    from desmoe.config import ConfigError, config_from_dict

    with pytest.raises(ConfigError, match=r"data\.domains\.d\.format: 'csv' is not of type 'text' \| "
                                          r"'prompt_response' \| 'chat'"):
        config_from_dict({"data": {"domains": {"d": {"train": "x.jsonl", "format": "csv"}}}})


def test_domain_configured_but_absent_from_the_mixed_file(tmp_path):
    mixed = tmp_path / "m.jsonl"
    mixed.write_text(json.dumps({"domain": "a", "text": "only a"}) + "\n")
    with pytest.raises(DataError, match=r"domain\(s\) b have no examples"):
        load_domain_examples(_data({"a": {}, "b": {}}, train=str(mixed)))


def test_eval_file_errors_name_the_eval_key_and_line(tmp_path):
    train = tmp_path / "t.jsonl"
    train.write_text("".join(json.dumps({"text": f"t{i}"}) + "\n" for i in range(5)))
    bad = tmp_path / "e.jsonl"
    bad.write_text('{"text": "ok"}\n{"txt": "no"}\n')
    with pytest.raises(DataError, match=r"e\.jsonl:2: the \"text\" field is missing"):
        load_domain_examples(_data({"d": {"train": str(train), "eval": str(bad)}}))
    _, report = load_domain_examples(_data({"d": {"train": str(train), "eval": str(bad)}}, on_bad_record="skip"))
    assert report["d"].skipped == 1 and [example_text(e) for e in report["d"].eval_examples] == ["ok"]
    with pytest.raises(DataError, match=r"data\.domains\.d\.eval: the glob .* matches no files"):
        load_domain_examples(_data({"d": {"train": str(train), "eval": str(tmp_path / "nope*.jsonl")}}))
    blank = tmp_path / "blank.jsonl"
    blank.write_text('{"text": "  "}\n')
    with pytest.raises(DataError, match=r"the eval data of domain\(s\) d has no examples"):
        load_domain_examples(_data({"d": {"train": str(train), "eval": str(blank)}}))


def test_read_jsonl_limit_is_exact(tmp_path):
    p = tmp_path / "d.jsonl"
    record = json.dumps({"text": "y" * 2000}).encode()
    p.write_bytes(record + b"\n")
    assert len(list(read_jsonl(str(p), key="k", max_record_bytes=len(record)))) == 1
    with pytest.raises(DataError, match=r"d\.jsonl:1: record longer than"):
        list(read_jsonl(str(p), key="k", max_record_bytes=len(record) - 1))
