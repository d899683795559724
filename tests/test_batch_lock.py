"""Two ldm batch runs on one output folder: the second is refused, or joins (--join) and the two
make every image exactly once; a holder killed with SIGKILL does not block the next run; a dead
joiner's claim is made by the survivor. Real processes on the tiny model, byte-compared with one
uninterrupted run; every write is logged by pid and the manifest is checked for duplicates."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections import Counter

import pytest
import torch
from test_batch_resume import PROMPTS, command, env, outputs

from ldm.batch import manifest
from ldm.batch.lock import LOCK_DIR, Claims, Lease, busy, this_process
from ldm.cli import main
from ldm.errors import LdmError

NUM_IMAGES = 16  # 8 prompts x 2 seeds, batches of 2
HANG_GUARD = 120  # seconds: only so that a broken run fails instead of hanging

# `python -c DRIVER batch ...`: ldm's CLI with two test hooks: every image write is logged as
# "<pid> <name>" to $WRITES, and pipeline calls after the first $GATE_AFTER wait for $GATE to exist
DRIVER = r"""
import os, sys, time
import ldm.batch.run as run
from ldm.cli import main
calls, call, save = [0], run._call, run._save
def gated(*args, **kwargs):
    calls[0] += 1
    if calls[0] > int(os.environ["GATE_AFTER"]):
        deadline = time.monotonic() + 120
        while not os.path.exists(os.environ["GATE"]) and time.monotonic() < deadline:
            time.sleep(0.02)
    return call(*args, **kwargs)
def logged(generated, path):
    save(generated, path)
    with open(os.environ["WRITES"], "a") as f:
        f.write(f"{os.getpid()} {os.path.basename(path)}\n")
run._call, run._save = gated, logged
sys.exit(main(sys.argv[1:]))
"""


@pytest.fixture(scope="module")
def reference(tiny_sd1, tmp_path_factory):
    """One uninterrupted single-process run with the subprocesses' one thread."""
    tmp = tmp_path_factory.mktemp("reference")
    (tmp / "p.txt").write_text(PROMPTS)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(command(tiny_sd1, tmp / "p.txt", tmp / "out")) == 0
    finally:
        torch.set_num_threads(threads)
    files = outputs(tmp / "out")
    assert len(files) == NUM_IMAGES
    return files


@pytest.fixture
def folder(tiny_sd1, tmp_path):
    (tmp_path / "p.txt").write_text(PROMPTS)
    return tmp_path


def start(tiny, tmp, *extra, gate_after=0, gate="go"):
    cmd = [sys.executable, "-c", DRIVER, *command(tiny, tmp / "p.txt", tmp / "out"), *extra]
    hooks = dict(GATE=str(tmp / gate), GATE_AFTER=str(gate_after), WRITES=str(tmp / "writes"))
    return subprocess.Popen(cmd, env={**env(), **hooks}, stderr=subprocess.PIPE, text=True)


def wait_for(condition, *procs) -> None:
    deadline = time.monotonic() + HANG_GUARD
    while not condition():
        if time.monotonic() > deadline:  # a hang guard, not a speed check
            raise TimeoutError(f"no progress in {HANG_GUARD} s: the run hangs")
        for p in procs:
            assert p.poll() is None, p.communicate()[1][-2000:]
        time.sleep(0.02)


def finish(proc) -> str:
    err = proc.communicate(timeout=HANG_GUARD)[1]
    assert proc.returncode == 0, err[-2000:]
    return err


def held_claims(out) -> int:
    """Claims being made now (a claim file exists only while its batch is being made)."""
    return len(list((out / LOCK_DIR / "claims").glob("*.claim")))


def writes(tmp) -> list[tuple[int, str]]:
    path = tmp / "writes"
    lines = path.read_text().splitlines() if path.exists() else []
    return [(int(pid), name) for pid, name in (line.split() for line in lines)]


def check_manifest(out) -> dict[str, dict]:
    """One line per output, each naming a complete file with its sha256; returns name -> line."""
    lines = [json.loads(x) for x in (out / manifest.MANIFEST).read_text().splitlines()]
    names = Counter(e["name"] for e in lines)
    assert max(names.values()) == 1, [n for n, c in names.items() if c > 1]
    for e in lines:
        assert e["status"] == "ok" and manifest.file_sha256(out / e["name"]) == e["sha256"]
    return {e["name"]: e for e in lines}


def test_a_second_run_on_a_held_folder_is_refused(folder, tiny_sd1, reference):
    out = folder / "out"
    holder = start(tiny_sd1, folder)  # blocked in its first pipeline call until "go"
    wait_for(lambda: held_claims(out) == 1, holder)
    cmd = [sys.executable, "-m", "ldm", *command(tiny_sd1, folder / "p.txt", out)]
    second = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=HANG_GUARD)
    (folder / "go").touch()
    finish(holder)
    assert second.returncode == 2 and second.stderr.count("\n") == 1, second.stderr
    err = second.stderr
    assert err.startswith("ldm: error: ") and "Traceback" not in err and "--join" in err
    assert f"pid {holder.pid} on {socket.gethostname()}, started " in err
    made = writes(folder)
    assert {pid for pid, _ in made} == {holder.pid} and len(made) == NUM_IMAGES
    assert len(check_manifest(out)) == NUM_IMAGES
    assert outputs(out) == reference  # and the lock folder is gone


def test_join_makes_every_image_exactly_once(folder, tiny_sd1, reference):
    out = folder / "out"
    first = start(tiny_sd1, folder, "--join")
    wait_for(lambda: held_claims(out) == 1, first)
    second = start(tiny_sd1, folder, "--join")
    # both inside a batch before either goes on: each makes at least one batch
    wait_for(lambda: held_claims(out) == 2, first, second)
    (folder / "go").touch()
    err_first, err_second = finish(first), finish(second)
    assert "no live run" in err_first and f"joined the run on {out} (pid {first.pid}" in err_second
    made = writes(folder)
    by_name = Counter(name for _, name in made)
    assert len(by_name) == NUM_IMAGES and set(by_name.values()) == {1}  # each made once
    assert {pid for pid, _ in made} == {first.pid, second.pid}
    rows = check_manifest(out)
    assert {(e["pid"], name) for name, e in rows.items()} == set(made)
    assert outputs(out) == reference


def test_a_killed_holder_is_taken_over(folder, tiny_sd1, reference):
    out = folder / "out"
    holder = start(tiny_sd1, folder, gate_after=1)  # makes one batch, then blocks in the next
    wait_for(lambda: len(writes(folder)) == 2 and held_claims(out) == 1, holder)
    holder.send_signal(signal.SIGKILL)
    holder.communicate(timeout=HANG_GUARD)
    assert busy(out) == [] and list((out / LOCK_DIR / "procs").glob("*.json"))  # left behind
    check_manifest(out)
    nxt = start(tiny_sd1, folder, gate_after=NUM_IMAGES)
    err = finish(nxt)
    assert f"took over {out}" in err and f"(pid {holder.pid} on {socket.gethostname()}" in err
    made = writes(folder)
    assert Counter(name for _, name in made).most_common(1)[0][1] == 1  # nothing made twice
    assert sum(pid == nxt.pid for pid, _ in made) == NUM_IMAGES - 2
    assert len(check_manifest(out)) == NUM_IMAGES
    assert outputs(out) == reference and not (out / LOCK_DIR).exists()


def test_a_killed_joiners_claim_is_made_by_the_survivor(folder, tiny_sd1, reference):
    out = folder / "out"
    first = start(tiny_sd1, folder)
    wait_for(lambda: held_claims(out) == 1, first)
    joiner = start(tiny_sd1, folder, "--join", gate="never")
    wait_for(lambda: held_claims(out) == 2, first, joiner)
    joiner.send_signal(signal.SIGKILL)  # dies holding its claim
    joiner.communicate(timeout=HANG_GUARD)
    (folder / "go").touch()
    finish(first)
    made = writes(folder)
    assert {pid for pid, _ in made} == {first.pid} and len(made) == NUM_IMAGES
    assert len(check_manifest(out)) == NUM_IMAGES
    assert outputs(out) == reference and not (out / LOCK_DIR).exists()


# ---- in one process: the lock and the manifest ------------------------------------------------
def test_lease_refuses_joins_by_signature_and_cleans_up(tmp_path):
    out = tmp_path / "out"
    me = this_process("2026-01-01 00:00:00 UTC", "sig")
    lease = Lease.acquire(out, me)  # flocks are per open file: a second open conflicts here too
    with pytest.raises(LdmError, match=rf"in use .*pid {os.getpid()} on .*started 2026-01-01"):
        Lease.acquire(out, me)
    with pytest.raises(LdmError, match="makes other images"):
        Lease.acquire(out, this_process("now", "other"), join=True)
    joiner = Lease.acquire(out, me, join=True)
    assert joiner.joined and not lease.joined and len(busy(out)) == 2
    claims = Claims(out)
    with claims.take("b0") as claim:
        assert claim is not None and claims.take("b0") is None
    with claims.take("b0") as again:
        assert again is not None  # released: free again
    lease.release()
    assert (out / LOCK_DIR).exists()  # the joiner still works here
    joiner.release()
    assert not (out / LOCK_DIR).exists() and busy(out) == []


def test_manifest_dedupes_when_writing_reading_and_compacting(tmp_path):
    path = tmp_path / manifest.MANIFEST
    with manifest.Writer(tmp_path) as w:
        assert w.append({"name": "a.png", "status": "failed"})
        assert not w.append({"name": "a.png", "status": "failed"})  # a writer writes a name once
    with manifest.Writer(tmp_path) as w:  # a later run makes it
        w.append({"name": "b.png", "status": "ok"})
        w.append({"name": "a.png", "status": "ok"})
    path.write_bytes(path.read_bytes() + b'{"note": 1}\n{"name": "c.png", "sta')
    assert {n: e["status"] for n, e in manifest.read(tmp_path).items()} == {
        "a.png": "ok", "b.png": "ok"
    }  # fmt: skip
    assert manifest.compact(tmp_path) and not manifest.compact(tmp_path)
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    assert lines == [
        {"note": 1},
        {"name": "b.png", "status": "ok"},
        {"name": "a.png", "status": "ok"},
    ]


def test_an_outdir_that_is_a_file_is_refused_in_one_line(tiny_sd1, tmp_path, capsys):
    (tmp_path / "p.txt").write_text("a\n")
    (tmp_path / "out").write_text("mine")
    assert main(command(tiny_sd1, tmp_path / "p.txt", tmp_path / "out")) == 2
    err = capsys.readouterr().err
    assert err.splitlines()[-1].startswith("ldm: error: --outdir ") and "Traceback" not in err
    assert (tmp_path / "out").read_text() == "mine"


def test_two_plain_runs_started_together_one_is_refused(folder, tiny_sd1, reference):
    """The issue's case: both pass the early check while neither holds the folder; registering
    under the lock lets exactly one in."""
    out = folder / "out"
    runs = [start(tiny_sd1, folder), start(tiny_sd1, folder)]
    wait_for(lambda: sum(p.poll() is not None for p in runs) == 1 and held_claims(out) == 1)
    (folder / "go").touch()
    errs = [p.communicate(timeout=HANG_GUARD)[1] for p in runs]
    (winner, w_err), (loser, l_err) = sorted(zip(runs, errs), key=lambda r: r[0].returncode)
    assert (winner.returncode, loser.returncode) == (0, 2), w_err[-2000:] + l_err[-2000:]
    assert f"pid {winner.pid} on " in l_err.splitlines()[-1] and "Traceback" not in l_err
    made = writes(folder)
    assert {pid for pid, _ in made} == {winner.pid} and len(made) == NUM_IMAGES
    assert len(check_manifest(out)) == NUM_IMAGES
    assert outputs(out) == reference
