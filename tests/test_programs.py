"""Declared command-line programs: real executables run with typed arguments, staged inputs, confined writes and limits.

The site is a real `SiteWorker`; the programs are a Python script written by
the test and coreutils' ``sort``. Nothing here mocks the process machinery.
"""

from __future__ import annotations

import json
import os
import sys
import textwrap
import time

import pandas as pd
import pytest

from dfm_prefect.core.errors import InvalidParametersError, OperationFailedError, UnknownOperationError
from tests.test_adapters_support import InProcessSite

TOOL = textwrap.dedent(
    """
    import json, os, subprocess, sys, time
    mode = sys.argv[1]
    if mode == "smooth":
        import csv
        window, source = int(sys.argv[2]), sys.argv[3]
        with open(source) as handle:
            values = [float(row["value"]) for row in csv.DictReader(handle)]
        with open("smoothed.csv", "w") as out:
            out.write("mean\\n")
            for i in range(len(values) - window + 1):
                out.write(f"{sum(values[i:i + window]) / window}\\n")
    elif mode == "echo":
        with open("result.json", "w") as out:
            json.dump({"argv": sys.argv[2:], "env": sorted(os.environ), "cwd": os.getcwd()}, out)
    elif mode == "fail":
        print("bad input: no convergence", file=sys.stderr)
        sys.exit(3)
    elif mode == "loop":
        subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
        with open("child-started", "w"):
            pass
        while True:
            pass
    elif mode == "escape":
        with open(sys.argv[2], "w") as out:
            out.write("escaped")
    """
)


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    root = tmp_path_factory.mktemp("programs")
    tool = root / "tool.py"
    tool.write_text(TOOL)
    pd.DataFrame({"value": [float(i % 7) for i in range(50)]}).to_csv(root / "series.csv", index=False)
    (root / "words.csv").write_text("word\npear\napple\nfig\n")
    python = os.path.realpath(sys.executable)
    programs = [
        {
            "name": "smooth",
            "executable": python,
            "argv": ["-I", str(tool), "smooth", "{window}", "{series}"],
            "params": {"window": {"type": "integer", "minimum": 1, "maximum": 20}},
            "inputs": {"series": {"format": "csv"}},
            "output": {"path": "smoothed.csv", "format": "csv", "kind": "table"},
        },
        {
            "name": "echo",
            "executable": python,
            "argv": ["-I", str(tool), "echo", "{label}", "--when={day}"],
            "params": {"label": {"type": "string", "max_length": 200}, "day": {"type": "date", "default": "2024-01-01"}},
            "output": {"path": "result.json"},
        },
        {"name": "fail", "executable": python, "argv": ["-I", str(tool), "fail"], "output": {"path": "result.json"}},
        {"name": "loop", "executable": python, "argv": ["-I", str(tool), "loop"], "output": {"path": "result.json"}, "timeout_s": 2},
        {
            "name": "escape",
            "executable": python,
            "argv": ["-I", str(tool), "escape", "{target}"],
            "params": {"target": {"type": "string"}},
            "output": {"path": "result.json"},
        },
        {
            "name": "sort_words",
            "executable": "/usr/bin/sort",
            "argv": ["-o", "sorted.txt", "{words}"],
            "inputs": {"words": {"format": "csv"}},
            "output": {"path": "sorted.txt", "format": "text"},
        },
    ]
    sources = [{"name": "series", "url": f"file://{root / 'series.csv'}"}, {"name": "words", "url": f"file://{root / 'words.csv'}"}]
    mp = pytest.MonkeyPatch()
    mp.setenv("DFM_PROGRAM_SITE_SECRET", "site-secret-value-42")
    with InProcessSite(
        tmp_path_factory.mktemp("programs-store"), sources, operations=["table.filter"], programs=programs,
        export={"kinds": ["value", "table"], "error_detail": "message", "disclosure": {"min_subset_size": 1}},
    ) as site:
        yield site, root
    mp.undo()


def test_a_program_reads_a_staged_input_and_its_output_file_becomes_a_table(site):
    site, _ = site
    got = site.call("program.smooth", window=5, series="series")
    values = pd.Series([float(i % 7) for i in range(50)])
    expected = values.rolling(5).mean().dropna().reset_index(drop=True)
    pd.testing.assert_series_equal(got["mean"], expected, check_names=False)
    # A result held at the site is an input too.
    kept = site.ref("table.filter", data="series", where=[{"column": "value", "op": ">", "value": 2}])
    again = site.call("program.smooth", window=2, series=kept.model_dump(mode="json"))
    assert len(again) == int((values > 2).sum()) - 1


def test_coreutils_runs_with_a_staged_file(site):
    site, _ = site
    assert site.call("program.sort_words", words="words").split() == ["apple", "fig", "pear", "word"]


def test_arguments_are_never_split_or_interpreted_and_the_site_environment_stays_out(site):
    site, _ = site
    attack = "x; rm -rf / #$(touch /tmp/dfm-pwned) `id` && echo {series} 'quoted'"
    got = site.call("program.echo", label=attack, day="2024-02-29")
    assert got["argv"] == [attack, "--when=2024-02-29"]
    assert not os.path.exists("/tmp/dfm-pwned")
    assert "DFM_PROGRAM_SITE_SECRET" not in got["env"] and set(got["env"]) <= {"PATH", "HOME", "TMPDIR", "LANG"}
    with pytest.raises(InvalidParametersError, match="executable"):
        site.call("program.echo", label="x", executable="/bin/sh")
    with pytest.raises(InvalidParametersError, match="day"):
        site.call("program.echo", label="x", day="tomorrow")
    with pytest.raises(UnknownOperationError, match="program.rm"):
        site.call("program.rm", target="/")


def test_a_failing_program_is_a_clear_error_and_the_site_keeps_serving(site):
    site, _ = site
    with pytest.raises(OperationFailedError, match=r"exit status 3(.|\n)*no convergence"):
        site.call("program.fail")
    assert site.call("program.echo", label="still here")["argv"][0] == "still here"


def test_a_program_that_loops_is_stopped_with_everything_it_started(site):
    site, _ = site
    started = time.monotonic()
    with pytest.raises(OperationFailedError, match="ran past its 2 s limit"):
        site.call("program.loop")
    assert time.monotonic() - started < 15
    leftovers = [p for p in os.listdir("/proc") if p.isdigit() and _cmdline(p).endswith("time.sleep(600)")]
    assert not leftovers


def _cmdline(pid: str) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            return handle.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def test_writes_outside_the_scratch_directory_are_refused(site, tmp_path):
    site, root = site
    for target in (tmp_path / "escaped.txt", root / "tool.py", root / "series.csv"):
        before = target.read_text() if target.exists() else None
        with pytest.raises(OperationFailedError, match="Permission denied|PermissionError"):
            site.call("program.escape", target=str(target))
        assert (target.read_text() if target.exists() else None) == before
    # Its own scratch directory is writable (a relative path lands there).
    with pytest.raises(OperationFailedError, match="wrote no file 'result.json'"):
        site.call("program.escape", target="inside.txt")


def test_programs_show_their_parameter_schemas_in_the_catalog(site):
    site, _ = site
    info = json.loads(site.worker.describe().model_dump_json())["operations"]
    smooth = info["program.smooth"]["params_schema"]
    assert smooth["properties"]["window"]["maximum"] == 20 and smooth["required"] == ["window", "series"]
    assert info["program.smooth"]["result_kind"] == "table"
    assert "day" in info["program.echo"]["params_schema"]["properties"]
