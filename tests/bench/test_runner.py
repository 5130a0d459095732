"""The runner's budget rules and the target checks, on synthetic inputs (no timing asserted)."""

import torch

from minrnn.bench.report import layer_targets, markdown_table, scan_targets
from minrnn.bench.runner import Budget, Case, Result, run_cases

CPU = torch.device("cpu")


def _case(name, calls):
    def step():
        calls.append(name)
        return torch.empty(4)  # 16 bytes, freed when the runner drops it

    return Case(name, step)


def test_run_cases_skips_by_prediction_and_repeats_the_rest():
    calls = []
    cases = [_case(n, calls) for n in ("slow", "big", "was_skipped", "ok")]
    previous = {"slow": Result(ms=1000.0, peak_bytes=1), "big": Result(ms=0.01, peak_bytes=10**9),
                "was_skipped": Result(note="skipped (...)"), "ok": Result(ms=0.01, peak_bytes=16)}
    budget = Budget(repeats=4, max_step_s=5.0, budget_s=10.0, max_bytes=10**10, min_repeat_s=0)
    res = run_cases(cases, CPU, budget, previous, scale=100.0)  # slow: ~100 s predicted; big: ~100 GB
    assert res["slow"].skipped and "100.0 s" in res["slow"].note
    assert res["big"].skipped and "GiB" in res["big"].note
    assert res["was_skipped"].skipped and "smaller size" in res["was_skipped"].note
    assert not res["ok"].skipped and len(res["ok"].times_ms) == 4 and res["ok"].note == ""
    assert res["ok"].peak_bytes == 16 and res["ok"].saved_bytes == 0
    assert calls.count("ok") == 2 + 1 + 4 * 2  # two warm-ups, the memory probe, four (warm step, repeat)
    assert set(calls) == {"ok"}


def test_run_cases_records_a_failing_candidate_and_goes_on():
    def broken():
        raise RuntimeError("no kernel for this size\nsecond line")

    calls = []
    res = run_cases([Case("broken", broken), _case("ok", calls)], CPU, Budget(repeats=2, min_repeat_s=0))
    assert res["broken"].skipped and res["broken"].note == "failed (RuntimeError: no kernel for this size)"
    assert len(res["ok"].times_ms) == 2


def test_run_cases_interleaves_repeats_each_after_a_warm_step():
    calls = []
    cases = [_case(n, calls) for n in ("a", "b")]
    res = run_cases(cases, CPU, Budget(repeats=3, measure_memory=False, min_repeat_s=0))
    assert calls[-12:] == ["a", "a", "b", "b"] * 3  # each candidate's warm step, then its timed one
    assert len(res["a"].cold_ms) == 3 and res["a"].fields()["cold_ms"] is not None
    calls.clear()
    res = run_cases(cases, CPU, Budget(repeats=3, measure_memory=False, min_repeat_s=0, warm_below_s=0))
    assert calls[-6:] == ["a", "b"] * 3  # steps this long (any, here) go without
    assert res["a"].cold_ms == [] and res["a"].fields()["cold_ms"] is None


def test_run_cases_repeats_tiny_steps_within_a_repeat():
    calls = []
    res = run_cases([_case("tiny", calls)], CPU, Budget(repeats=3, measure_memory=False, min_repeat_s=1.0,
                                                        max_steps_per_repeat=7))["tiny"]
    assert res.steps_per_repeat == 7 and len(res.times_ms) == 3
    assert len(calls) == 2 + 3 * (1 + 7)  # two warm-ups, then 3 times a warm step and a repeat of 7


def test_run_cases_cuts_repeats_to_the_budget():
    cases = [Case("sleepy", lambda: __import__("time").sleep(0.02))]
    res = run_cases(cases, CPU, Budget(repeats=50, budget_s=0.1, max_step_s=5.0, measure_memory=False))
    n = len(res["sleepy"].times_ms)
    assert 1 <= n < 50 and res["sleepy"].note == f"{n} repeat{'s' if n > 1 else ''} (time budget)"


def _layer_rows(ratio_floor_256, ratio_floor_4096, gru_ratio, peak, gru_peak):
    rows = []
    for T, rf in ((256, ratio_floor_256), (4096, ratio_floor_4096)):
        for fam in ("minGRU", "minLSTM"):
            rows.append({"batch": 16, "width": 128, "T": T, "candidate": f"{fam}[x]", "family": fam,
                         "default": True, "ratio_floor": rf, "ratio_rnn": gru_ratio, "peak_bytes": peak})
        rows.append({"batch": 16, "width": 128, "T": T, "candidate": "nn.GRU", "family": "minGRU",
                     "default": False, "ratio_floor": None, "ratio_rnn": 1.0, "peak_bytes": gru_peak})
    return {"configs": [{"batch": 16, "width": 128, "lengths": [256, 4096]}], "rows": rows}


def test_layer_targets_judge_the_numbers():
    ok = layer_targets(_layer_rows(1.2, 1.3, 0.5, 100, 200))
    assert [t["pass"] for t in ok] == [True] * 6
    bad = layer_targets(_layer_rows(1.31, None, 1.5, 300, 200))
    assert [t["pass"] for t in bad] == [False, None, False, None, False, False]
    assert all("(B=16, D=128)" in t["target"] for t in bad)


def test_scan_targets_judge_the_numbers():
    rows = [{"default": True, "T": T, "elements": 16 * T * 128, "pct_copy": pct, "max_abs_err": err}
            for T, pct, err in ((1024, 10.0, 1e-7), (4096, 55.0, 2e-6), (16384, 49.0, 3e-6))]
    bw, err = scan_targets({"rows": rows})
    assert bw["pass"] is False and "49% at T=16384" in bw["measured"]  # T=1024 is below 8M elements
    assert err["pass"] is True and err["measured"] == "2.0e-06"


def test_markdown_table_aligns_columns():
    t = markdown_table(["a", "bbb"], [["xx", "y"]]).splitlines()
    assert t == ["| a  | bbb |", "|----|-----|", "| xx | y   |"]


def test_run_cases_counts_the_page_faults_of_each_step():
    """A step that touches fresh pages faults them in; one that reuses its buffer does not."""
    import mmap

    pages = 64

    def fresh_pages():  # an anonymous mapping, touched once per page, then unmapped
        m = mmap.mmap(-1, pages * mmap.PAGESIZE)
        for i in range(pages):
            m[i * mmap.PAGESIZE] = 1
        m.close()

    buf = bytearray(pages * mmap.PAGESIZE)

    def reused():
        for i in range(pages):
            buf[i * mmap.PAGESIZE] = 1

    res = run_cases([Case("fresh", fresh_pages), Case("reused", reused)], CPU,
                    Budget(repeats=5, measure_memory=False, min_repeat_s=0))
    fresh, kept = res["fresh"].fields()["page_faults"], res["reused"].fields()["page_faults"]
    assert fresh >= pages and kept < pages / 8
