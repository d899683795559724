"""ldm batch: prompt files, names, sweeps, validation, grouping, manifest, resume, failures."""

from __future__ import annotations

import json
import re
import tracemalloc

import pytest

from ldm.batch import manifest
from ldm.batch.jobs import Invalid, Job, JobSpec, iter_jobs, parse_sweep, validate
from ldm.batch.names import image_name, inside
from ldm.batch.run import batches
from ldm.cli import main
from ldm.errors import LdmError

SPEC = JobSpec(factor=8, default_size=(64, 64))
ARGS = ["--steps", "2", "--batch-size", "2", "--no-progress"]


def jobs_of(path, spec=SPEC):
    return [j for j in iter_jobs(path, spec) if isinstance(j, Job)]


def invalid_of(path, spec=SPEC):
    return [(j.line, j.message) for j in iter_jobs(path, spec) if isinstance(j, Invalid)]


# ---- names -----------------------------------------------------------------------------------
HOSTILE = ["../../etc/passwd", "a/b\\c", "..", "CON", "NUL", "com1", "x\x00y\x1b[2J\n", "",
           "🎨" * 75, "é" * 300, "a cat", "A CAT!"]  # fmt: skip


def test_names_are_safe_unique_and_inside_outdir(tmp_path):
    names = [image_name(i, p, 2**40) for i, p in enumerate(HOSTILE)]
    assert len(set(names)) == len(names)  # "a cat" and "A CAT!" share a slug, not a name
    for name in names:
        assert re.fullmatch(r"\d{6}-[a-z0-9-]+-\d+\.png", name), name
        assert len(name.encode()) < 80
        assert inside(tmp_path, name).parent == tmp_path.resolve()
    assert names[-2].split("-", 1)[1] == names[-1].split("-", 1)[1]
    with pytest.raises(LdmError):
        inside(tmp_path, "../escape.png")


# ---- prompt files ----------------------------------------------------------------------------
def test_text_file_a1111_options(tmp_path):
    f = tmp_path / "p.txt"
    f.write_text(
        "# a comment\n\n  a red cube  \n"
        '--prompt "a blue ball, shiny" --negative_prompt "blurry" --seed 5 --steps 30 '
        '--cfg_scale 7 --sampler_name "Euler a" --width 128 --height 96\n'
        "--prompt x --sampler_name 'DPM++ 2M Karras' --n_iter 2\n"
    )
    a, b, c, d = jobs_of(f)
    assert (a.line, a.params["prompt"], a.params["seed"], a.params["height"]) == (
        3,
        "a red cube",
        0,
        64,
    )
    assert b.line == 4 and b.params == dict(
        prompt="a blue ball, shiny", negative_prompt="blurry", seed=5, steps=30,
        guidance_scale=7.0, guidance_rescale=0.0, sampler="euler_ancestral", schedule="default",
        eta=None, height=96, width=128, clip_skip=1,
    )  # fmt: skip
    assert (c.params["sampler"], c.params["schedule"], c.params["seed"], d.params["seed"]) == (
        "dpmpp_2m", "karras", 0, 1)  # fmt: skip
    assert [j.index for j in (a, b, c, d)] == [0, 1, 2, 3] and d.entry == 2


def test_jsonl_and_csv_give_the_same_jobs_as_text(tmp_path):
    (tmp_path / "p.txt").write_text('--prompt "a, b" --seed 3 --cfg_scale 5\n--prompt c\n')
    (tmp_path / "p.jsonl").write_text(
        '{"prompt": "a, b", "seed": 3, "guidance_scale": 5}\n\n{"prompt": "c", "eta": null}\n'
    )
    (tmp_path / "p.csv").write_text('prompt,seed,CFG scale\n"a, b",3,5\nc,,\n')
    want = [j.params for j in jobs_of(tmp_path / "p.txt")]
    assert len(want) == 2
    assert [j.params for j in jobs_of(tmp_path / "p.jsonl")] == want
    assert [j.params for j in jobs_of(tmp_path / "p.csv")] == want


def test_invalid_entries_are_reported_with_line_numbers(tmp_path):
    f = tmp_path / "p.txt"
    f.write_bytes(
        b"fine\n"  # 1
        b"bad \xff utf8\n"  # 2
        b"--prompt x --steps zero\n"  # 3
        b"--prompt x --sampler_name nosuch\n"  # 4
        b"--prompt x --width 513\n"  # 5
        b'--prompt "unbalanced\n'  # 6
        b"--prompt x --seed -1\n"  # 7
        b"--prompt x --bogus 1\n"  # 8
        b"--prompt x --steps 0\n"  # 9
        b"also fine\n"  # 10
    )
    bad = invalid_of(f)
    assert [line for line, _ in bad] == [2, 3, 4, 5, 6, 7, 8, 9]
    assert "UTF-8" in bad[0][1] and "integer" in bad[1][1] and "nosuch" in bad[2][1]
    assert "multiple of 8" in bad[3][1] and "bogus" in bad[6][1]
    good = jobs_of(f)
    assert [(j.line, j.index) for j in good] == [(1, 0), (10, 1)]
    j = tmp_path / "p.jsonl"
    j.write_text('{"prompt": "a"}\n[1]\n{"prompt": 3}\n{"prompt": "x", "steps": 2.5}\n{broken\n')
    assert [line for line, _ in invalid_of(j)] == [2, 3, 4, 5]
    c = tmp_path / "p.csv"
    c.write_text("prompt,steps\na,1\nb,2,3\n")
    assert invalid_of(c) == [(3, "3 cells but the header has 2 columns")]
    c.write_text("prompt,nosuch\na,1\n")
    with pytest.raises(LdmError, match=":1: unknown CSV column"):
        list(iter_jobs(c, SPEC))


def test_seeds_n_per_prompt_and_sweeps(tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("a\n--prompt b --seed 100\n")
    spec = JobSpec(seeds=[1, 2, 3], default_size=(64, 64))
    assert [j.params["seed"] for j in jobs_of(f, spec)] == [1, 2, 3, 100]
    spec = JobSpec(defaults={"seed": 7}, n_per_prompt=2, default_size=(64, 64))
    assert [j.params["seed"] for j in jobs_of(f, spec)] == [7, 8, 100, 101]
    sweeps = [parse_sweep("guidance_scale=5,7.5"), parse_sweep("sampler=euler,DPM++ 2M Karras")]
    jobs = jobs_of(f, JobSpec(sweeps=sweeps, n_per_prompt=2, default_size=(64, 64)))
    assert len(jobs) == 2 * 2 * 2 * 2
    first = jobs[:8]
    assert [(j.params["guidance_scale"], j.params["sampler"], j.params["schedule"],
             j.params["seed"]) for j in first[:4]] == [
        (5.0, "euler", "default", 0), (5.0, "euler", "default", 1),
        (5.0, "dpmpp_2m", "karras", 0), (5.0, "dpmpp_2m", "karras", 1),
    ]  # fmt: skip
    assert first[2].axes == (("guidance_scale", 5.0), ("sampler", "DPM++ 2M Karras"))
    for bad in ("seed=1,2", "guidance_scale", "steps=a", "nosuch=1"):
        with pytest.raises(LdmError, match="--sweep"):
            parse_sweep(bad)


def test_a_large_file_is_streamed_in_bounded_memory(tmp_path):
    f = tmp_path / "big.txt"
    with open(f, "w") as out:
        for i in range(10_000):
            out.write(f'--prompt "prompt number {i}" --seed {i}\n' if i != 4_000 else "--x\n")
    tracemalloc.start()
    num_jobs, invalid, num_invalid = validate(f, SPEC)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert (num_jobs, num_invalid, invalid[0].line) == (9_999, 1, 4_001)
    assert peak < 3 * 2**20  # 10k jobs held in memory would take > 10 MB


# ---- grouping --------------------------------------------------------------------------------
def test_batches_group_only_compatible_jobs(tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("a\n--prompt b --steps 3\nc\nd\n--prompt e --steps 3\nf\n" + "long\n")
    jobs = jobs_of(f)
    # pretend "long" needs two 75-token chunks: it must not share a batch with short prompts
    out = list(batches(jobs, 2, lambda p: 2 if p["prompt"] == "long" else 1))
    assert [[j.params["prompt"] for j in b] for b in out] == [
        ["a", "c"],
        ["b", "e"],
        ["d", "f"],
        ["long"],
    ]


# ---- manifest --------------------------------------------------------------------------------
def test_manifest_skips_torn_lines_and_repair_cuts_them(tmp_path):
    path = tmp_path / manifest.MANIFEST
    with manifest.Writer(tmp_path) as w:
        w.append({"name": "a.png", "status": "ok"})
    path.write_bytes(path.read_bytes() + b'{"name": "b.png", "sta')
    assert list(manifest.read(tmp_path)) == ["a.png"]
    manifest.repair(tmp_path)
    with manifest.Writer(tmp_path) as w:
        w.append({"name": "c.png", "status": "ok"})
    assert list(manifest.read(tmp_path)) == ["a.png", "c.png"]
    assert path.read_text().count("\n") == 2


# ---- the command, end to end on a tiny random model ---------------------------------------
def run_cli(tiny, prompts, outdir, *extra) -> int:
    return main(["batch", "--prompts", str(prompts), "--model", str(tiny), "--outdir",
                 str(outdir), *ARGS, *extra])  # fmt: skip


def pngs(outdir) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(outdir.glob("*.png"))}


def test_batch_writes_pngs_manifest_and_resumes(tiny_sd1, tmp_path, capsys):
    from ldm.infotext import parse_infotext, read_png_metadata

    f = tmp_path / "p.txt"
    f.write_text('a red cube\n--prompt "a blue ball" --seed 5 --cfg_scale 5\na red cube\n')
    out = tmp_path / "out"
    assert run_cli(tiny_sd1, f, out, "--n-per-prompt", "2", "--grid") == 0
    files = pngs(out)
    assert list(files) == [
        "000000-a-red-cube-0.png", "000001-a-red-cube-1.png", "000002-a-blue-ball-5.png",
        "000003-a-blue-ball-6.png", "000004-a-red-cube-0.png", "000005-a-red-cube-1.png",
    ]  # fmt: skip
    assert files["000000-a-red-cube-0.png"] == files["000004-a-red-cube-0.png"]  # same job twice
    infotext, record = read_png_metadata(out / "000002-a-blue-ball-5.png")
    assert parse_infotext(infotext)["seed"] == 5 and record["guidance_scale"] == 5.0
    lines = [json.loads(x) for x in (out / "manifest.jsonl").read_text().splitlines()]
    assert sorted(e["name"] for e in lines) == sorted(files)
    for e in lines:
        assert (
            e["status"] == "ok"
            and e["seconds"] > 0
            and e["params"]["prompt"] in e["name"].replace("-", " ")
        )
        assert e["sha256"] == manifest.file_sha256(out / e["path"])
    assert len(list((out / "grids").glob("*.png"))) == 3
    err = capsys.readouterr().err
    assert "6 made" in err and "text encodings: 3 computed" in err  # 2 prompts + the negative

    # a second run makes nothing and changes nothing; a deleted image is made again
    (out / "000003-a-blue-ball-6.png").unlink()
    assert run_cli(tiny_sd1, f, out, "--n-per-prompt", "2") == 0
    assert "1 made, 5 already done" in capsys.readouterr().err
    assert pngs(out) == files

    # batch size 1 gives the same bytes: every image has its own seeded noise
    one = tmp_path / "one"
    assert run_cli(tiny_sd1, f, one, "--n-per-prompt", "2", "--batch-size", "1") == 0
    assert pngs(one) == files


def test_invalid_file_refuses_to_start_or_skips(tiny_sd1, tmp_path, capsys):
    f = tmp_path / "p.txt"
    f.write_text("ok\n--prompt x --steps 0\nfine\n")
    out = tmp_path / "out"
    assert run_cli(tiny_sd1, f, out) == 2
    err = capsys.readouterr().err
    assert f"{f}:2:" in err and "--skip-invalid" in err and "Traceback" not in err
    assert not out.exists()
    assert run_cli(tiny_sd1, f, out, "--skip-invalid") == 0
    assert "skipped" in capsys.readouterr().err
    assert len(pngs(out)) == 2


def test_failures_are_recorded_and_the_run_goes_on(tiny_sd1, tmp_path, monkeypatch):
    from ldm.pipeline import Pipeline

    call = Pipeline.__call__

    def poisoned(self, prompts, seeds, **kw):
        if "poison" in prompts:
            raise LdmError("the U-Net produced NaN/Inf in fp32; try fp32")
        return call(self, prompts, seeds, **kw)

    monkeypatch.setattr(Pipeline, "__call__", poisoned)
    f = tmp_path / "p.txt"
    f.write_text("a\npoison\nb\n")
    out = tmp_path / "out"
    assert run_cli(tiny_sd1, f, out) == 1
    assert sorted(pngs(out)) == ["000000-a-0.png", "000002-b-0.png"]
    lines = [json.loads(x) for x in (out / "manifest.jsonl").read_text().splitlines()]
    failed = [e for e in lines if e["status"] == "failed"]
    assert len(failed) == 1 and failed[0]["name"] == "000001-poison-0.png"
    assert "NaN" in failed[0]["error"] and failed[0]["job"]["line"] == 2


def test_foreign_files_are_never_overwritten(tiny_sd1, tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("a\n")
    out = tmp_path / "out"
    out.mkdir()
    (out / "000000-a-0.png").write_bytes(b"not ours")
    assert run_cli(tiny_sd1, f, out) == 2
    assert (out / "000000-a-0.png").read_bytes() == b"not ours"


def test_an_image_whose_manifest_line_was_lost_is_recovered(tiny_sd1, tmp_path, capsys):
    f = tmp_path / "p.txt"
    f.write_text("a\nb\nc\n")
    out = tmp_path / "out"
    assert run_cli(tiny_sd1, f, out) == 0
    files = pngs(out)
    path = out / manifest.MANIFEST
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[:-1]) + lines[-1][:20])  # died between rename and append
    capsys.readouterr()
    assert run_cli(tiny_sd1, f, out) == 0
    assert "0 made, 2 already done, 1 recovered" in capsys.readouterr().err
    assert pngs(out) == files
    assert len(manifest.read(out)) == 3
