"""bench/RESULTS.md: a run of some benches replaces only their sections and keeps the rest as it was."""

from __future__ import annotations

from devkit.bench_results import Results, dated, marker

FILE = "\n".join(
    [
        "# Benchmark results",
        "",
        "- date: 2026-01-01 00:00 UTC",
        "",
        marker("bench_alpha"),
        "## Alpha",
        "",
        "old alpha",
        "",
        "### Alpha notes written by hand",
        "",
        marker("bench_gamma"),
        "## Gamma one",
        "",
        "old gamma",
        "",
        "## Gamma two",
        "",
        "more gamma",
        "",
    ]
)


def test_an_unchanged_file_renders_back_as_it_was() -> None:
    assert Results.parse(FILE).render() == FILE


def test_a_rerun_bench_replaces_all_of_its_sections_and_nothing_else() -> None:
    text = Results.parse(FILE).replaced({"bench_gamma": "## Gamma one\n\nnew gamma\n"}).render()

    assert text.startswith("# Benchmark results\n\n- date: 2026-01-01 00:00 UTC\n")
    assert "old alpha" in text and "### Alpha notes written by hand" in text
    assert "new gamma" in text
    assert "old gamma" not in text and "## Gamma two" not in text
    assert text.index("## Alpha") < text.index("new gamma")


def test_a_new_bench_goes_where_a_full_run_would_put_it() -> None:
    results = Results.parse(FILE).replaced({"bench_beta": "## Beta\n\nbeta"})

    assert [module for module, _ in results.blocks] == ["bench_alpha", "bench_beta", "bench_gamma"]
    last = Results.parse(FILE).replaced({"bench_zeta": "## Zeta"})
    assert [module for module, _ in last.blocks][-1] == "bench_zeta"
    assert results.render().count(marker("bench_beta")) == 1


def test_a_file_written_before_markers_is_kept_whole_as_its_header() -> None:
    old = "# Benchmark results\n\n## Something\n\nnumbers\n"

    text = Results.parse(old).replaced({"bench_alpha": "## Alpha\n\nfresh"}).render()

    assert text == old + "\n" + marker("bench_alpha") + "\n## Alpha\n\nfresh\n"


def test_a_dated_section_says_when_it_ran_under_its_first_heading() -> None:
    section = dated("## Alpha\n\nnumbers\n\n## Alpha two\n\nmore", "Run on 2026-02-02.")

    assert section.splitlines()[:4] == ["## Alpha", "", "Run on 2026-02-02.", ""]
    assert section.count("Run on") == 1
