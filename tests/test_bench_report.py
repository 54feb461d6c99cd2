"""The benchmark harness (probes, ranks, byte meter) and `memtron bench report` on tiny inputs.

The report tests draw from JSON files that the real benchmarks wrote (tests/data/bench), so a
change of a benchmark's result format that the report cannot read fails here; no benchmark runs.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest

from memtron.bench import harness
from memtron.bench.report import (
    FIGURES,
    Outcome,
    ReportError,
    find_bench_dir,
    load_quality,
    render,
    report,
)
from memtron.cli import main as cli_main

FIXTURES = Path(__file__).parent / "data" / "bench"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# --------------------------------------------------------------------------- probes


def test_load_probe_sees_this_process_burn_cpu() -> None:
    probe = harness.LoadProbe(interval=0.05).start()
    give_up = time.perf_counter() + 60  # only if the sampler never runs (a loaded machine)
    x = 0
    while len(probe.samples) < 3 and time.perf_counter() < give_up:
        x += 1  # one core busy: the machine cannot read as idle
    load = probe.stop()
    assert load["samples"] >= 3
    assert 0.0 < load["busy_mean"] <= 1.0
    assert load["busy_max"] >= load["busy_mean"]
    assert 0.0 <= load["others_mean"] <= 1.0
    assert len(load["loadavg_before"]) == 3 and len(load["loadavg_after"]) == 3
    assert "CPU busy" in harness.load_label(load)


def test_ram_probe_sees_an_allocation() -> None:
    hwm = harness.reset_peak_rss()
    base = harness.rss()
    block = bytearray(64 * harness.MiB)  # zero-filled: the pages are touched
    block[:: 4096] = b"\x01" * len(block[:: 4096])
    grown = harness.peak_rss(hwm) - base
    del block
    assert grown >= 60 * harness.MiB
    info = harness.meminfo()
    assert 0 < harness.mem_available() <= info["MemTotal"]


def test_machine_names_cpu_and_cores() -> None:
    m = harness.machine()
    assert m["cores"] >= 1 and m["cpu"] and m["torch"]
    assert f"{m['cores']} cores" in harness.machine_label(m)


# --------------------------------------------------------------------------- ranks, byte meter


def _collectives(rank: int, world: int) -> dict:
    import torch
    import torch.distributed as dist

    meter = harness.ByteMeter().install()
    dist.init_process_group("gloo")
    try:
        dist.all_reduce(torch.ones(10))  # not measured
        with meter.measuring():
            dist.all_reduce(torch.ones(1000))  # 4,000 B payload; ring: 2 (p-1)/p x 4,000 sent
            inp = torch.arange(8, dtype=torch.float32) + 8 * rank
            out = torch.empty(8)
            dist.all_to_all_single(out, inp)  # 32 B payload, half of it to the other rank
            splits = [1, 3] if rank == 0 else [2, 2]  # uneven: rank 0 sends 3 rows, rank 1 2
            recv = [1, 2] if rank == 0 else [3, 2]
            out2 = torch.empty(sum(recv), 2)
            dist.all_to_all_single(out2, torch.ones(4, 2), recv, splits)
        counted = meter.take()
        # memtron's own ring counter, read as shipped: one attention forward + backward
        from memtron.parallel.context import RingTraffic, ring_attention

        q, k, v = (torch.randn(1, 2, 8, 4, requires_grad=True) for _ in range(3))
        RingTraffic.take()
        ring_attention(q, k, v, dist.group.WORLD, world, rank).sum().backward()
        return {"counted": counted, "received": out.tolist(), "ring": RingTraffic.take(),
                "kv_bytes": k.nbytes + v.nbytes}
    finally:
        dist.destroy_process_group()
        meter.uninstall()


def _fails_on_rank_one(rank: int, world: int) -> int:
    if rank == 1:
        raise ValueError("rank one refuses")
    return rank


def test_byte_meter_counts_known_collectives_on_two_ranks() -> None:
    run = harness.spawn_ranks(_collectives, 2, timeout=600)
    results = run.raise_errors("byte meter ranks")
    assert run.wall_seconds > 0 and run.low_mem_available > 0
    for rank, result in enumerate(results):
        counted = result["counted"]
        by_api: dict[str, dict[str, float]] = {}
        for row in counted["rows"]:
            entry = by_api.setdefault(row["api"], {"calls": 0, "bytes": 0, "wire": 0.0})
            for key in entry:
                entry[key] += row[key]
        assert by_api["all_reduce"] == {"calls": 1, "bytes": 4000, "wire": 4000.0}
        sent_uneven = 3 * 8 if rank == 0 else 2 * 8  # rows to the other rank x 8 B
        assert by_api["all_to_all_single"] == {"calls": 2, "bytes": 32 + 32,
                                               "wire": 16.0 + sent_uneven}
        assert counted["payload"] == 4000 + 32 + 32
        assert counted["pg_bytes"] == counted["payload"]  # the check one level down agrees
        # the meter's total time is its rows' (a bookkeeping check, not a speed bound)
        assert counted["seconds"] == pytest.approx(sum(r["seconds"] for r in counted["rows"]))
        # ring: forward passes K/V one hop; backward passes them again plus the fp32 dK/dV
        # accumulators at every one of the cp steps (here fp32 too)
        ring, kv = result["ring"], result["kv_bytes"]
        assert ring["bytes"] == {"fwd": kv, "bwd": kv + 2 * kv}
        assert ring["post"]["fwd"] > 0 and ring["wait"]["bwd"] > 0
    # the exchange itself was not disturbed by the meter
    assert results[0]["received"] == [0, 1, 2, 3, 8, 9, 10, 11]


def test_spawn_ranks_reports_the_failing_rank() -> None:
    run = harness.spawn_ranks(_fails_on_rank_one, 2, timeout=600)
    assert not run.ok
    assert any("rank 1 failed" in e and "rank one refuses" in e for e in run.errors)
    with pytest.raises(RuntimeError, match="rank one refuses"):
        run.raise_errors("test")


def test_bench_run_writes_the_envelope(tmp_path: Path) -> None:
    import argparse

    args = argparse.Namespace(quick=True, out=tmp_path / "r.json")
    with harness.BenchRun("toy", args) as run:
        run.baseline = {"kind": "nothing", "value": 1.0}
        run.results = [{"x": 1}]
    doc = json.loads((tmp_path / "r.json").read_text())
    assert doc["bench"] == "toy" and doc["quick"] is True
    assert doc["machine"]["cores"] >= 1 and "busy_mean" in doc["load"]
    assert doc["baseline"]["kind"] == "nothing" and doc["results"] == [{"x": 1}]
    assert doc["args"]["out"] == str(tmp_path / "r.json")


# --------------------------------------------------------------------------- report


def _fixture_outcomes() -> list[Outcome]:
    return [Outcome(p.stem, "ok", data=json.loads(p.read_text()))
            for p in sorted(FIXTURES.glob("*.json"))]


def _compare_dir(tmp_path: Path) -> Path:
    def buckets(acc: float) -> dict:
        return {b: {"accuracy": acc, "low": acc - 0.05, "high": acc + 0.05, "n": 400,
                    "per_seed": [acc, acc]} for b in ("head", "torso", "tail", "all")}

    summary = [{"arm": arm, "seeds": [0, 1], "params": p, "table_params": t,
                "flops_per_token": f, "train_tokens": 409600, "train_flops": f * 409600,
                "valid_loss": 1.5, "train_seconds": 10.0, "chance": 0.0625,
                "buckets": buckets(acc)}
               for arm, p, t, f, acc in (("dense", 900_000, 0, 5.4e6, 0.2),
                                         ("memory", 1_500_000, 524_288, 5.3e6, 0.3))]
    runs = {row["arm"]: [{"seed": s, "loadavg": [1.0 + s, 1.0, 1.0]} for s in (0, 1)]
            for row in summary}
    out = tmp_path / "compare"
    out.mkdir()
    (out / "compare.json").write_text(json.dumps(
        {"config": "configs/tiny-cpu.yaml", "overrides": [], "seeds": [0, 1],
         "summary": summary, "runs": runs}))
    return out


def test_report_from_fixture_json_writes_markdown_and_pngs(tmp_path: Path) -> None:
    outcomes = _fixture_outcomes()
    assert {o.name for o in outcomes} >= {"pkm_layer", "memory_parallel", "context_parallel",
                                          "parallel_overhead", "memory_fetch"}
    outcomes.append(load_quality(_compare_dir(tmp_path)))
    out = tmp_path / "report"
    path = render(outcomes, out, {"command": "memtron bench report --quick",
                                  "machine": harness.machine(), "wall_s": 1.0})
    text = path.read_text()
    assert all(o.status == "ok" for o in outcomes), [(o.name, o.note, o.tail) for o in outcomes]
    for title in ("Memory layer step time vs product-key-memory", "Gather bandwidth vs memcpy",
                  "bytes/token and step time per layout", "memory and time per sequence length",
                  "Parallel overhead", "Fetch throughput", "Quality: equal-compute comparison"):
        assert title in text
    pngs = sorted(out.glob("*.png"))
    assert len(pngs) >= 9
    for png in pngs:
        assert png.read_bytes()[:8] == PNG_MAGIC
        assert f"]({png.name})" in text
    # every section names the machine, the load and the same-run baseline
    sections = text.split("\n## ")[1:]
    for section in sections:
        assert "Machine: " in section and "CPU load during the run" in section
        assert "Baseline measured in the same run" in section
    assert "Failed" not in text


def test_report_marks_a_malformed_result_failed(tmp_path: Path) -> None:
    broken = Outcome("memory_fetch", "ok", data={"bench": "memory_fetch", "results": {}})
    text = render([broken, *_fixture_outcomes()[:1]], tmp_path).read_text()
    assert broken.status == "failed" and "report could not draw it" in broken.note
    assert "## Failed" in text and "KeyError" in text


def test_every_figure_has_a_fixture_or_is_quality_or_gpu() -> None:
    have = {p.stem for p in FIXTURES.glob("*.json")}
    assert set(FIGURES) - have <= {"quality", "gpu_kernels"}


def _fake_bench_dir(tmp_path: Path) -> Path:
    bench = tmp_path / "bench"
    bench.mkdir()
    (bench / "pkm_layer.py").write_text(
        "import sys\nprint('starting')\nprint('out of luck: no such table', file=sys.stderr)\n"
        "sys.exit(3)\n")
    # a stand-in that writes a real result, as the real script would with --out
    shutil.copy(FIXTURES / "memory_fetch.json", bench / "fetch_result.json")
    (bench / "memory_fetch.py").write_text(
        "import shutil, sys\nfrom pathlib import Path\n"
        "out = Path(sys.argv[sys.argv.index('--out') + 1])\n"
        "shutil.copy(Path(__file__).with_name('fetch_result.json'), out)\n")
    return bench


def test_a_failing_bench_is_reported_and_the_report_still_written(tmp_path: Path) -> None:
    bench = _fake_bench_dir(tmp_path)
    path, outcomes = report(tmp_path / "out", quick=True, only=["pkm_layer", "memory_fetch"],
                            bench_dir=bench, timeout=300, log=lambda line: None)
    status = {o.name: o for o in outcomes}
    assert status["pkm_layer"].status == "failed" and status["pkm_layer"].returncode == 3
    assert status["memory_fetch"].status == "ok"
    text = path.read_text()
    assert "### pkm_layer: exit code 3" in text and "out of luck: no such table" in text
    assert "## Fetch throughput" in text and (tmp_path / "out" / "memory_fetch.png").is_file()


def test_cli_exit_code_and_missing_bench_dir(tmp_path: Path, capsys) -> None:
    bench = _fake_bench_dir(tmp_path)
    code = cli_main(["bench", "report", "--quick", "--only", "pkm_layer", "--bench-dir",
                     str(bench), "--out", str(tmp_path / "o")])
    assert code == 1 and "FAILED: pkm_layer" in capsys.readouterr().out
    assert (tmp_path / "o" / "REPORT.md").is_file()
    with pytest.raises(ReportError, match="--bench-dir"):
        find_bench_dir(tmp_path / "nowhere")
    assert cli_main(["bench", "report", "--only", "nonsense", "--out", str(tmp_path)]) == 2


def test_the_bench_dir_is_found(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    found = find_bench_dir()
    assert (found / "pkm_layer.py").is_file() and found.name == "bench"
    assert (found.parent / "memtron" / "bench" / "report.py").is_file()  # this checkout's
    monkeypatch.setenv("MEMTRON_BENCH_DIR", str(_fake_bench_dir(tmp_path)))
    assert find_bench_dir() == (tmp_path / "bench").resolve()
