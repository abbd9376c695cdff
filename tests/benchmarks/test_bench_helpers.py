"""The benchmarks' helper logic that a one-off GPU run depends on, checked on the CPU."""

import json
import os
import sys

import pytest

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(__file__))), "benchmarks")
sys.path.insert(0, BENCH)

import memory_vs_speed  # noqa: E402
import model_size  # noqa: E402
import summarize  # noqa: E402


def test_floor_is_issue_3s_formula():
    base = {"fwd_s": 0.03, "bwd_s": 0.07, "opt_s": 0.005}
    bw = {"d2h": 50e9, "h2d": 25e9}
    # Link-bound both ways: 2 GB out at 50 GB/s, 2 GB in at 25 GB/s.
    assert memory_vs_speed.floor_s(base, 2e9, 2e9, bw) == pytest.approx(0.04 + 0.08 + 0.005)
    # Out is hidden under forward, in is not.
    assert memory_vs_speed.floor_s(base, 1e9, 2e9, bw) == pytest.approx(0.03 + 0.08 + 0.005)
    # Compute-bound both ways: the phase times.
    assert memory_vs_speed.floor_s(base, 1e6, 1e6, bw) == pytest.approx(0.03 + 0.07 + 0.005)


def test_oom_includes_library_workspace_failures():
    assert model_size.is_oom(RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert model_size.is_oom(RuntimeError("CUBLAS_STATUS_ALLOC_FAILED when calling cublasCreate"))
    assert not model_size.is_oom(RuntimeError("shape mismatch"))


def test_summary_reads_both_folders_and_survives_a_cut_file(tmp_path, capsys):
    out, work = tmp_path / "out", tmp_path / "work"
    out.mkdir()
    work.mkdir()
    (work / "steps.tsv").write_text("a\t0\t5\nb\t0\t6\nc\t124\t30\nd\t1\t2\n")
    (out / "a.json").write_text(json.dumps({"summary": [{"x": 1.5}], "rows": [1]}))
    (work / "b.json").write_text(json.dumps({"summary": {"y": 2}}))
    (work / "c.json").write_text('{"summary": [{"x"')  # cut by the time limit mid-write
    rc = summarize.main(out, work)
    printed = capsys.readouterr().out
    steps = json.loads((out / "summary.json").read_text())
    assert rc == 1
    assert [s["step"] for s in steps] == ["a", "b", "c", "d"]
    assert steps[0]["result"]["rows"] == [1] and steps[1]["summary"] == {"y": 2}
    assert "unreadable" in steps[2]["result"]["error"] and steps[3]["result"] is None
    assert "time limit" in printed and "no JSON" in printed
    assert "2 passed, 2 failed: ['c', 'd']" in printed
