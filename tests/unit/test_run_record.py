"""run.json: what actually ran, one entry per start, one history like metrics.jsonl; and the
versions it records."""

from __future__ import annotations

import json
import platform

import torch

from mnistdist import rundir
from mnistdist.distributed import software_versions
from mnistdist.rundir import RunDir


def start(step: int, world_size: int = 1) -> dict:
    return {"start_step": step, "world_size": world_size, "precision": "float32"}


def test_a_fresh_start_begins_the_record_and_resumes_add_to_it(tmp_path):
    run = RunDir(tmp_path)
    assert rundir.read_run_record(tmp_path) == []
    rundir.record_start(run, start(0, world_size=2))
    rundir.record_start(run, start(600, world_size=3))
    assert [(s["start_step"], s["world_size"]) for s in rundir.read_run_record(tmp_path)] == [(0, 2), (600, 3)]
    assert json.loads(run.run_record.read_text())["starts"][1]["precision"] == "float32"


def test_a_resume_drops_the_starts_whose_work_it_redoes(tmp_path):
    """Resumed from step 600 again (the start at 600 died before its next checkpoint; the one
    at 900 resumed from a checkpoint that turned out damaged): those two are gone."""
    run = RunDir(tmp_path)
    for step in (0, 600, 900):
        rundir.record_start(run, start(step))
    rundir.record_start(run, start(600, world_size=4))
    assert [(s["start_step"], s["world_size"]) for s in rundir.read_run_record(tmp_path)] == [(0, 1), (600, 4)]
    rundir.record_start(run, start(0, world_size=2))  # a fresh start: a new history
    assert [(s["start_step"], s["world_size"]) for s in rundir.read_run_record(tmp_path)] == [(0, 2)]


def test_an_unreadable_record_reads_as_empty_and_is_replaced(tmp_path):
    run = RunDir(tmp_path)
    run.run_record.write_text("{not json")
    assert rundir.read_run_record(tmp_path) == []
    rundir.record_start(run, start(600))
    assert [s["start_step"] for s in rundir.read_run_record(tmp_path)] == [600]


def test_software_versions_name_what_runs():
    import accelerate

    versions = software_versions()
    assert versions["python"] == platform.python_version() and versions["torch"] == torch.__version__
    assert versions["accelerate"] == accelerate.__version__ and versions["mnistdist"].startswith("mnistdist ")
