"""tltrain.safe_io: bounded reads of regular files only, names kept inside their folder, writes through no link."""
import json
import os
import threading
import time

import pytest

from tltrain import safe_io
from tltrain.errors import DataError


def test_reads_only_regular_files_and_never_blocks(tmp_path):
    fifo = tmp_path / "status.json"
    os.mkfifo(fifo)
    started = time.monotonic()
    with pytest.raises(DataError, match="FIFO"):
        safe_io.load_json(fifo)
    assert time.monotonic() - started < 2
    link = tmp_path / "metrics.json"
    link.symlink_to("/dev/zero")
    with pytest.raises(DataError, match="character device"):
        safe_io.read_bytes(link, 1024)
    with pytest.raises(DataError, match="folder"):
        safe_io.read_bytes(tmp_path, 1024)
    assert safe_io.load_json_or_empty(link) == {} and safe_io.load_json_or_empty(fifo) == {}


def test_size_cap_and_symlink_refusal(tmp_path):
    big = tmp_path / "big.json"
    big.write_text("[" + "0," * 1000 + "0]")
    with pytest.raises(DataError, match="over the 100-byte limit"):
        safe_io.read_bytes(big, 100, "index")
    target = tmp_path / "real"
    target.write_text("{}")
    link = tmp_path / "link"
    link.symlink_to(target)
    assert safe_io.load_json(link) == {}
    with pytest.raises(DataError, match="symbolic link"):
        safe_io.read_bytes(link, 100, follow_links=False)


@pytest.mark.parametrize("text, match", [
    ("[" * 100_000 + "]" * 100_000, "nested"),
    ("[" * 70 + "]" * 70, "deeper than 64"),
    ("1" * 5000, "not valid JSON"),
    ('{"a": ', "not valid JSON"),
])
def test_hostile_json(tmp_path, text, match):
    path = tmp_path / "x.json"
    path.write_text(text)
    with pytest.raises(DataError, match=match):
        safe_io.load_json(path)


def test_yaml_alias_bomb_refused_fast(tmp_path):
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, 9)]
    path = tmp_path / "config.yaml"
    path.write_text("\n".join(lines) + "\n")
    assert path.stat().st_size < 3000
    started = time.monotonic()
    with pytest.raises(DataError, match="alias bomb"):
        safe_io.load_yaml(path)
    assert time.monotonic() - started < 5


def test_yaml_keeps_interpolations_and_refuses_python_tags(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("secret: ${oc.env:HOME}\nnested: {a: 1, b: [2, 3]}\n")
    assert safe_io.load_yaml(path) == {"secret": "${oc.env:HOME}", "nested": {"a": 1, "b": [2, 3]}}
    path.write_text("x: !!python/object/apply:os.system ['touch marker']\n")
    with pytest.raises(DataError, match="YAML"):
        safe_io.load_yaml(path)
    assert not (tmp_path / "marker").exists()
    path.write_text("- a\n- b\n")
    with pytest.raises(DataError):
        safe_io.load_yaml(path)
    path.write_text("")
    assert safe_io.load_yaml(path) == {}


@pytest.mark.parametrize("name", ["../victim", "/etc/passwd", "a/../../b", "", "~/x", "a\\..\\b", "a\x00b", 7, None])
def test_inside_refuses_names_that_leave(tmp_path, name):
    with pytest.raises(DataError):
        safe_io.inside(tmp_path, name, "shard")


def test_inside_follows_links_and_accepts_plain_names(tmp_path):
    (tmp_path / "sub").mkdir()
    assert safe_io.inside(tmp_path, "sub/shard-000.tar") == tmp_path / "sub" / "shard-000.tar"
    (tmp_path / "escape").symlink_to("/etc")
    with pytest.raises(DataError, match="symbolic link"):
        safe_io.inside(tmp_path, "escape/passwd")


def test_plain_name_pattern():
    import re
    pattern = re.compile(r"step-\d{8}")
    assert safe_io.plain_name("step-00000010", pattern) == "step-00000010"
    for bad in ["../../victim_dir", "step-1", "step-00000010/..", "..", 3]:
        with pytest.raises(DataError, match="not a valid name"):
            safe_io.plain_name(bad, pattern, "index.json", "checkpoint name")


def test_atomic_write_replaces_symlink_instead_of_following(tmp_path):
    victim = tmp_path / "authorized_keys"
    victim.write_text("original\n")
    link = tmp_path / "report.md"
    link.symlink_to(victim)
    safe_io.atomic_write_text(link, "report\n")
    assert victim.read_text() == "original\n"
    assert not link.is_symlink() and link.read_text() == "report\n"
    hard = tmp_path / "hard.json"
    os.link(victim, hard)
    safe_io.atomic_write_json(hard, {"a": 1})
    assert victim.read_text() == "original\n" and json.loads(hard.read_text()) == {"a": 1}


def test_atomic_open_leaves_target_untouched_on_error(tmp_path):
    target = tmp_path / "out.csv"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with safe_io.atomic_open(target, "w") as handle:
            handle.write("new")
            raise RuntimeError("boom")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.csv"]


def test_printable_markdown_and_csv_escaping():
    hostile = "ok\x1b[31mred\x1b]0;title\x07\nssh-rsa AAAA attacker\r\u202e"
    shown = safe_io.printable(hostile)
    assert "\x1b" not in shown and "\n" not in shown and "\r" not in shown and "\u202e" not in shown
    assert "\\x1b" in shown and "\\n" in shown
    cell = safe_io.markdown_text("a | b <script> [x](http://e) `c`")
    assert "|" not in cell.replace("\\|", "") and "<" not in cell.replace("\\<", "")
    assert safe_io.csv_cell("=HYPERLINK(\"x\")") == "'=HYPERLINK(\"x\")"
    assert safe_io.csv_cell("-1+2") == "'-1+2" and safe_io.csv_cell("10_left") == "10_left"
    assert safe_io.csv_cell(-1.5) == -1.5
    assert len(safe_io.printable("x" * 5000, 100)) == 103


def test_finite_number():
    assert safe_io.finite_number(5, "num_classes", 1, 1000, integer=True) == 5
    for bad in [10**9, True, 2.5, "5", float("nan")]:
        with pytest.raises(DataError, match="num_classes"):
            safe_io.finite_number(bad, "num_classes", 1, 1000, integer=True)


def test_fifo_read_in_thread_does_not_hang(tmp_path):
    """A reader of a FIFO (no writer) returns an error at once instead of waiting for a writer for ever."""
    fifo = tmp_path / "lock"
    os.mkfifo(fifo)
    result = []
    worker = threading.Thread(target=lambda: result.append(safe_io.load_json_or_empty(fifo)), daemon=True)
    worker.start()
    worker.join(5)
    assert result == [{}]


def test_load_json_object_and_sha256_file(tmp_path):
    import hashlib

    assert safe_io.load_json_object(tmp_path / "absent.json") == {}
    path = tmp_path / "metrics.json"
    path.write_text("[1, 2]")
    with pytest.raises(DataError, match="expected a JSON object, not list"):
        safe_io.load_json_object(path)
    path.write_text('{"a": 1}')
    assert safe_io.load_json_object(path) == {"a": 1}
    data = os.urandom(3 * 1024 * 1024 + 17)
    blob = tmp_path / "shard.tar"
    blob.write_bytes(data)
    assert safe_io.sha256_file(blob, block=1 << 20) == hashlib.sha256(data).hexdigest()
    fifo = tmp_path / "fifo.tar"
    os.mkfifo(fifo)
    with pytest.raises(DataError, match="FIFO"):
        safe_io.sha256_file(fifo)
