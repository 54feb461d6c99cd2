"""CLI spellings: --ckpt in, --out out, --rows SOURCE, and the old spellings kept for one release
as aliases that say on stderr what to use instead."""

from pathlib import Path

import pytest

from memtron.cli import build_parser, main, resolve_old_positionals, row_sources
from memtron.config import ConfigError


def _parse(argv: list[str]):
    args = build_parser().parse_args(argv)
    resolve_old_positionals(args)
    return args


@pytest.mark.parametrize("old,new,fields", [
    (["export", "bank", "C", "O"], ["export", "bank", "--ckpt", "C", "--out", "O"],
     {"ckpt": "C", "out": "O"}),
    (["export", "hf", "C", "O", "--values", "bank"],
     ["export", "hf", "--ckpt", "C", "--out", "O", "--tables", "bank"],
     {"ckpt": "C", "out": "O", "tables": "bank"}),
    (["import", "hf", "H", "C", "train.steps=3"],
     ["import", "hf", "--ckpt", "H", "--out", "C", "train.steps=3"],
     {"ckpt": "H", "out": "C", "overrides": ["train.steps=3"]}),
    (["serve-memory", "B"], ["serve-memory", "--rows", "B"], {"rows": "B"}),
    (["fetch", "--bank", "B", "--text", "t"], ["fetch", "--rows", "B", "--text", "t"],
     {"rows": "B"}),
    (["status", "R"], ["status", "--ckpt", "R"], {"ckpt": "R"}),
    (["cancel", "R"], ["cancel", "--ckpt", "R"], {"ckpt": "R"}),
    (["submit", "c.yaml", "train.steps=2"], ["submit", "--config", "c.yaml", "train.steps=2"],
     {"config": "c.yaml", "overrides": ["train.steps=2"]}),
    (["generate", "--ckpt", "C", "--prompt", "p", "--values", "mmap:B", "--explicit", "S"],
     ["generate", "--ckpt", "C", "--prompt", "p", "--rows", "B", "--rows", "S"],
     {"rows": ["B", "S"]}),
    (["generate", "--ckpt", "C", "--prompt", "p", "--bank", "http://h:1"],
     ["generate", "--ckpt", "C", "--prompt", "p", "--rows", "http://h:1"],
     {"rows": ["http://h:1"]}),
    (["memory", "build-explicit", "--ckpt", "C", "--references", "r", "--out", "S",
      "--dtype", "pq"],
     ["memory", "build-explicit", "--ckpt", "C", "--references", "r", "--out", "S",
      "--codec", "pq"], {"codec": "pq"}),
])
def test_old_spellings_are_aliases_that_warn(old, new, fields, capsys):
    args = _parse(new)
    assert {k: getattr(args, k) for k in fields} == fields
    assert "deprecated" not in capsys.readouterr().err
    args = _parse(old)
    assert {k: getattr(args, k) for k in fields} == fields
    err = capsys.readouterr().err
    assert "memtron: warning:" in err and "is deprecated; use --" in err, err


def test_deprecation_names_the_new_spelling(capsys):
    _parse(["fetch", "--bank", "B", "--text", "t"])
    assert "warning: --bank is deprecated; use --rows PATH|URL" in capsys.readouterr().err
    _parse(["export", "bank", "C", "O"])
    err = capsys.readouterr().err
    assert "use --ckpt C" in err and "use --out O" in err


def test_required_paths_fail_with_usage(capsys):
    with pytest.raises(SystemExit) as exit_:
        _parse(["export", "bank", "--ckpt", "C"])
    assert exit_.value.code == 2
    assert "required: --out" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        _parse(["export", "bank", "--ckpt", "C", "X", "Y"])  # C given twice
    assert "--ckpt given twice" in capsys.readouterr().err


def test_fetch_needs_a_bank(capsys):
    assert main(["fetch", "--text", "t"]) == 2
    assert "--rows: fetch needs a bank directory" in capsys.readouterr().err


def test_rows_sources(tmp_path):
    assert row_sources(["ram"]) == ("ram", None)
    with pytest.raises(ConfigError, match="^--rows .*nowhere"):
        row_sources([str(tmp_path / "nowhere")])
    with pytest.raises(ConfigError, match="^--rows http://127.0.0.1:9"):
        row_sources(["http://127.0.0.1:9"])  # nothing listens there


def test_submit_out_sets_the_run_dir(tmp_path, capsys):
    recipe = Path(__file__).parent.parent / "configs" / "tiny-cpu.yaml"
    assert main(["submit", "--config", str(recipe), "--out", str(tmp_path / "run"),
                 "--dry-run"]) == 0
    assert f"run dir {tmp_path / 'run'}" in capsys.readouterr().out
