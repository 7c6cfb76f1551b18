"""The reliability sweep (benchmarks/reliability_sweep.py) through the CLI and the core jobs.

Each bad input must give a clear one-line error (exit 2) or a clean stop: no traceback, no
output or temporary file left behind, no pickle executed, the last good checkpoint intact. The
dock cases are in test_reliability_docks.py.
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import reliability_sweep as sweep


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return sweep.build_inputs(tmp_path_factory.mktemp("inputs"))


@pytest.mark.parametrize("case", sweep.CLI_CASES, ids=lambda c: c.name)
def test_cli_case(case, inputs, tmp_path):
    outcome = sweep.run_cli_case(case, inputs, tmp_path)
    assert outcome.ok, outcome.row()
    assert not (inputs["good"].parent / "PWNED").exists(), "a pickle was executed"


@pytest.mark.parametrize("name", list(sweep.JOB_CASES))
def test_job_case(name, inputs, tmp_path):
    outcome = sweep.run_job_case(name, inputs, tmp_path, random.Random(0))
    assert outcome.ok, outcome.row()


def test_simulated_full_disk_leaves_nothing_half_written(inputs, tmp_path):
    """Where no tmpfs can be mounted (not root), the disk cases fall back to this simulation:
    test it directly so both paths are covered on every machine."""
    out = tmp_path / "out"
    out.mkdir()
    with sweep.simulated_oserror(28):
        rc, msg = sweep.run_cli(sweep._stain_argv(inputs, out))
    assert rc == 2 and "no space left" in msg.lower(), msg
    assert not sweep.stray_files(out)
