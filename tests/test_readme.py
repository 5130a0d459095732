"""The README stays short, its links resolve, and its figures are the docs' figures.

Its Python blocks run in tests/test_docs.py, with the docs' blocks.
"""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_readme_is_at_most_300_lines():
    assert README.count("\n") <= 300


def test_relative_links_resolve():
    links = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", README)
    local = [link for link in links if not re.match(r"[a-z]+://", link)]
    assert len(local) >= 10
    missing = [link for link in local if not (ROOT / link).exists()]
    assert not missing, missing


def test_the_at_a_glance_table_is_copied_from_the_benchmarks_page():
    """Each figure of the README's CPU table appears in the same row of the run of record's table."""
    bench = (ROOT / "docs" / "benchmarks" / "index.md").read_text()
    rows = {"`minrnn.MinGRU` (cpu backend)": "minGRU[cpu] (auto)", "`nn.GRU`": "nn.GRU",
            "the paper's log-space minGRU (autograd)": "paper-minGRU",
            "`minrnn.MinLSTM` (cpu backend)": "minLSTM[cpu] (auto)", "`nn.LSTM`": "nn.LSTM"}
    for readme_name, bench_name in rows.items():
        cells = re.search(rf"^\| {re.escape(readme_name)} \|(.*)\|$", README, flags=re.M).group(1).split("|")
        timed = re.search(rf"^\| {re.escape(bench_name)}\s*\|(.*)\|$", bench, flags=re.M).group(1).split("|")
        ms = [c.strip() for c in timed]  # T = 16, 64, 256, 1024, 4096, 16384
        assert [c.strip() for c in cells[:4]] == [ms[0], ms[2], ms[3], ms[4]], readme_name
        peaks = re.findall(rf"^\| {re.escape(bench_name)}\s*\|(.*)\|$", bench, flags=re.M)[3].split("|")
        assert cells[4].strip() == peaks[4].strip(), readme_name
