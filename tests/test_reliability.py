"""Runs that survive the machine (docs/reliability.md): one writer per run folder, read-only and
full disks as one-line errors that leave the last checkpoint whole, budgets nobody meant refused.

The disk faults are made where the kernel would make them, without root (and as root, where a
chmod'd folder does not stop a write): a read-only folder is one whose ``os.open`` and
``os.mkdir`` fail with EROFS (or EACCES), a full disk one whose new files are written to
``/dev/full``, where every write fails with the kernel's own ENOSPC. Where this machine lets an
unprivileged user namespace mount file systems, the same runs also go onto a real read-only
mount and a real tmpfs too small for two checkpoints."""

from __future__ import annotations

import errno
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from jeat import JeatError
from jeat.attacks.threats import check_budget, check_step_size
from jeat.checkpoint import load_checkpoint, save_checkpoint
from jeat.cli import main
from jeat.distributed import DistContext
from jeat.errors import EnvironmentFailure
from jeat.evaluate import EvalContext, build_attack, parse_attack
from jeat.locks import LOCK_NAME, FolderBusy, hold_folder, holder
from jeat.runs import RunPaths, load_trained, run_folder_of
from jeat.utils import atomic_write, pyplot, save_figure, save_image_grid, write_json

# a run of about a second in this process: 2 epochs of 64 images, no final steps
TINY = [
    "--quiet", "--epochs", "2", "--set", "data.train_subset=64",
    "--set", "model.options.width=8", "--set", "objective.attack.steps=1",
    "--set", "eval.epoch_n=0", "--set", "tensorboard=false",
    "--set", "final_eval=false", "--set", "final_samples=false",
    "--set", "final_analysis=false", "--set", "final_scores=false",
    "--set", "final_report=false",
]  # fmt: skip


def jeat(capsys, *args) -> tuple[int, str, str]:
    """``jeat ARGS`` in this process: exit code, stdout, stderr."""
    capsys.readouterr()
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def one_line(err: str, *needles: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("jeat: error: "), err
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


def files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def same_weights(a: Path, b: Path) -> bool:
    sa, sb = load_trained(a)[0].state_dict(), load_trained(b)[0].state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def full_disk(monkeypatch, folder: Path, when=lambda: True) -> None:
    """From the moment ``when()`` holds, every file jeat writes below ``folder`` lands on a full
    disk: its temporary file is created, then its descriptor points to /dev/full."""
    real = tempfile.mkstemp
    root = folder.absolute()

    def mkstemp(*args, **kwargs):
        fd, name = real(*args, **kwargs)
        if Path(name).absolute().is_relative_to(root) and when():
            dev = os.open("/dev/full", os.O_WRONLY)
            os.dup2(dev, fd)
            os.close(dev)
        return fd, name

    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)


def read_only(monkeypatch, folder: Path, code: int = errno.EROFS) -> None:
    """Creating or writing anything below ``folder`` fails with ``code``, as on a read-only
    mount (EROFS) or in a folder without write permission (EACCES)."""
    root = folder.absolute()
    real_open, real_mkdir = os.open, os.mkdir

    def inside(path) -> bool:
        return Path(os.fsdecode(path)).absolute().is_relative_to(root)

    def fake_open(path, flags, *args, **kwargs):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT) and inside(path):
            raise OSError(code, os.strerror(code), os.fsdecode(path))
        return real_open(path, flags, *args, **kwargs)

    def fake_mkdir(path, *args, **kwargs):
        if inside(path):
            raise OSError(code, os.strerror(code), os.fsdecode(path))
        return real_mkdir(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", fake_open)
    monkeypatch.setattr(os, "mkdir", fake_mkdir)


def no_training(monkeypatch) -> None:
    def fit(self, end):
        raise AssertionError("training started")

    monkeypatch.setattr("jeat.train._Loop.fit", fit)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted TINY run (2 epochs)."""
    run = tmp_path_factory.mktemp("reference") / "run"
    assert main(["train", "--out", str(run), *TINY]) == 0
    return run


# --------------------------------------------------------------------------- one writer
_HOLD = """
import sys
from jeat.locks import hold_folder
with hold_folder(sys.argv[1]):
    print("held", flush=True)
    sys.stdin.read()
"""


def _holder(folder: Path) -> subprocess.Popen:
    """Another process that holds ``folder`` until its stdin is closed."""
    proc = subprocess.Popen(
        [sys.executable, "-c", _HOLD, str(folder)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_writer_stops_at_once_naming_the_first(tmp_path, capsys, reference, monkeypatch):
    """While another process holds a run folder, `train --resume`, `eval` and `report` into it
    stop before any work with one line naming the folder and the holder's pid (exit 2), and
    leave the folder as it was; `eval --out` elsewhere still reads the run."""
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    proc = _holder(run)
    try:
        before = files(run)
        assert holder(run)["pid"] == proc.pid and LOCK_NAME in before
        no_training(monkeypatch)
        for args in (
            ["train", "--out", run, "--resume", *TINY],
            ["eval", run, "--attacks", "clean", "--n", "10", "--quiet"],
            ["report", run],
        ):
            code, _, err = jeat(capsys, *args)
            assert code == 2
            one_line(err, f"{run} is in use by another jeat process", f"pid {proc.pid}")
            assert files(run) == before
        with pytest.raises(FolderBusy, match="wait for it to end"), hold_folder(run):
            pass
        out = tmp_path / "elsewhere.json"
        code, _, err = jeat(capsys, "eval", run, "--attacks", "clean", "--n", "10", "--out", out)
        assert code == 0 and out.exists(), err
    finally:
        proc.stdin.close()
        proc.wait()
    assert not (run / LOCK_NAME).exists()  # released: the holder removed its lock file
    code, _, err = jeat(capsys, "report", run)  # and the folder is free again
    assert code == 0, err


def test_two_new_runs_racing_for_one_folder_exactly_one_runs(tmp_path, reference):
    """Two `jeat train` processes started together into one new folder: one trains, the
    other stops with one line (the folder is in use, or, if it came second, holds a run)."""
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "jeat.cli", "train", "--out", str(run), *TINY]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]  # fmt: skip
    results = [(p.wait(), p.stderr.read()) for p in procs]
    for p in procs:
        p.stdout.close()
        p.stderr.close()
    codes = sorted(code for code, _ in results)
    assert codes == [0, 2], results
    err = next(e for code, e in results if code == 2)
    line = one_line(err, str(run))
    assert "is in use by another jeat process" in line or "already holds a run" in line, line
    assert same_weights(run, reference)  # one writer: exactly the run a single process makes
    rows = (run / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(r)["epoch"] for r in rows] == [1, 2]
    assert not (run / LOCK_NAME).exists()


def test_a_lock_left_by_a_killed_process_blocks_nothing(tmp_path, capsys, reference):
    """A process killed (SIGKILL) while it holds a folder leaves its lock file, naming it; the
    kernel has dropped the lock, so a new run starts there (the file does not make the folder
    'not empty') and takes the lock over."""
    run = tmp_path / "run"
    code = "import os, sys\nfrom jeat.locks import hold_folder\n"
    code += "with hold_folder(sys.argv[1]):\n    os.kill(os.getpid(), 9)\n"
    r = subprocess.run([sys.executable, "-c", code, str(run)], capture_output=True)
    assert r.returncode == -signal.SIGKILL
    assert files(run) == [LOCK_NAME] and holder(run)["pid"]
    code, _, err = jeat(capsys, "train", "--out", run, *TINY)
    assert code == 0, err
    assert same_weights(run, reference) and not (run / LOCK_NAME).exists()


def test_holding_is_reentrant_and_leaves_no_trace(tmp_path):
    """One process may hold a folder again (train_and_finish, then the loop); the lock file
    goes on the last release, and so do the folders the hold created when they are empty."""
    folder = tmp_path / "a" / "b"
    with hold_folder(folder):
        assert holder(folder)["pid"] == os.getpid()
        with hold_folder(folder):
            assert (folder / LOCK_NAME).exists()
        assert (folder / LOCK_NAME).exists()
        assert run_folder_of(folder / "eval.json") == folder.absolute()
    assert not (tmp_path / "a").exists()
    with hold_folder(folder):
        (folder / "kept.txt").write_text("x")
    assert files(tmp_path) == ["a", "a/b", "a/b/kept.txt"]
    assert run_folder_of(folder / "kept.txt") is None  # no run.json, no lock: not a run


def test_a_cache_folder_waits_its_turn(tmp_path, monkeypatch):
    """``wait=True`` (the judge cache): the second process says whom it waits for, then takes
    the folder once the first lets go, instead of failing."""
    folder = tmp_path / "judge"
    proc = _holder(folder)

    class Release(io.StringIO):  # the first process lets go once we said we are waiting
        def write(self, text):
            proc.stdin.close()
            return super().write(text)

    said = Release()
    monkeypatch.setattr(sys, "stderr", said)
    with hold_folder(folder, wait=True):
        assert proc.wait() == 0
        assert holder(folder)["pid"] == os.getpid()
    assert f"waiting for {folder}, in use by pid {proc.pid}" in said.getvalue()


def test_under_torchrun_rank_0_holds_and_every_rank_stops_with_its_error(tmp_path):
    """Rank 0 alone takes the lock; the others learn its outcome (an all-gather) and stop with
    the same one line instead of waiting for it at a barrier."""
    from jeat.train import _hold_run_folder

    class Ranks(DistContext):
        def __init__(self, rank, told):
            super().__init__(rank, 2, rank)
            object.__setattr__(self, "told", told)

        def all_gather(self, obj):
            return [self.told if self.rank else obj, None]

    run = tmp_path / "run"
    busy = Ranks(1, "RUN is in use by another jeat process (pid 1)")
    with (
        pytest.raises(JeatError, match="in use by another jeat process"),
        _hold_run_folder(run, busy),
    ):
        pass
    assert not run.exists()  # rank 1 never touches the folder
    with _hold_run_folder(run, Ranks(0, None)):
        assert holder(run)["pid"] == os.getpid()
    with _hold_run_folder(run, Ranks(1, None)):
        assert not run.exists()


# --------------------------------------------------------------------------- disks
@pytest.mark.parametrize(
    ("code", "says"),
    [(errno.EROFS, "the file system is read-only"), (errno.EACCES, "permission denied")],
    ids=["EROFS", "EACCES"],
)
def test_a_read_only_output_folder_is_one_line_before_any_training(
    tmp_path, capsys, monkeypatch, code, says
):
    ro = tmp_path / "ro"
    ro.mkdir()
    read_only(monkeypatch, ro, code)
    no_training(monkeypatch)
    code_, _, err = jeat(capsys, "train", "--out", ro / "sub" / "run", *TINY)
    assert code_ == 2
    one_line(err, f"cannot write {ro / 'sub' / 'run'}", says)
    assert files(tmp_path) == ["ro"]


@pytest.mark.skipif(
    not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root writes into a chmod'd folder"
)
def test_a_folder_without_write_permission_is_one_line(tmp_path, capsys, monkeypatch):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        no_training(monkeypatch)
        code, _, err = jeat(capsys, "train", "--out", ro / "run", *TINY)
        assert code == 2
        one_line(err, f"cannot write {ro / 'run'}", "permission denied")
        assert files(ro) == []
    finally:
        ro.chmod(0o755)


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs Linux's /dev/full")
def test_a_full_disk_keeps_the_last_checkpoint_and_resume_gives_the_same_weights(
    tmp_path, capsys, monkeypatch, reference
):
    """The disk fills once the first checkpoint is on it: the run stops with one line naming
    the file and "no space left" (exit 2), no temporary file stays, the checkpoint still
    loads, and --resume from it (with space again) ends with the uninterrupted run's weights.
    A new run that cannot write its first file leaves nothing."""
    run = tmp_path / "run"
    full_disk(monkeypatch, run, when=RunPaths(run).checkpoint.exists)
    code, _, err = jeat(capsys, "train", "--out", run, *TINY)
    assert code == 2
    line = one_line(err, f"cannot write {run}", "no space left on the device")
    assert f"continue with jeat train --out {run} --resume" in line
    assert not [f for f in files(run) if f.endswith(".tmp")] and LOCK_NAME not in files(run)
    assert load_checkpoint(RunPaths(run).checkpoint)["epoch"] == 1
    assert not RunPaths(run).model.exists()
    monkeypatch.undo()
    code, out, err = jeat(capsys, "train", "--out", run, "--resume", *TINY)
    assert code == 0, err
    assert "resuming" in out and same_weights(run, reference)

    new = tmp_path / "new"
    full_disk(monkeypatch, new)
    code, _, err = jeat(capsys, "train", "--out", new, *TINY)
    assert code == 2 and "no space left" in one_line(err)
    assert not new.exists()


def _write_npz(path):
    import numpy as np

    with atomic_write(path, "wb") as fh:
        np.savez_compressed(fh, x=np.zeros((64, 64), np.float32))


def _write_figure(path):
    fig = pyplot().figure()
    fig.gca().plot([0, 1], [1, 0])
    save_figure(fig, path)


WRITERS = {
    "checkpoint": lambda p: save_checkpoint(p, {"model_state": {"w": torch.randn(64, 64)}}),
    "json": lambda p: write_json(p, {"rows": list(range(2000))}),
    "image grid": lambda p: save_image_grid(torch.rand(16, 3, 8, 8), p, nrow=4),
    "figure": _write_figure,
    "npz": _write_npz,
}


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs Linux's /dev/full")
@pytest.mark.parametrize("kind", sorted(WRITERS))
def test_every_writer_on_a_full_disk_keeps_the_old_file_and_no_temporary(
    tmp_path, monkeypatch, kind
):
    """Checkpoints, tables, images, figures, arrays: each goes through the one atomic writer,
    which turns the disk's ENOSPC (torch.save's RuntimeError included) into one
    EnvironmentFailure naming the file, removes its temporary file and leaves the previous
    file as it was."""
    path = tmp_path / f"out.{kind}"
    path.write_bytes(b"previous")
    full_disk(monkeypatch, tmp_path)
    with pytest.raises(EnvironmentFailure, match="no space left on the device") as info:
        WRITERS[kind](path)
    assert info.value.path == str(path) and info.value.errno == errno.ENOSPC
    assert str(path) in str(info.value) and "\n" not in str(info.value)
    assert path.read_bytes() == b"previous" and files(tmp_path) == [path.name]


def test_a_write_that_the_disk_refuses_at_the_rename_is_mapped_too(tmp_path, monkeypatch):
    def refuse(src, dst):
        raise OSError(errno.EDQUOT, os.strerror(errno.EDQUOT), str(dst))

    monkeypatch.setattr(os, "replace", refuse)
    with pytest.raises(EnvironmentFailure, match="disk quota exceeded"):
        write_json(tmp_path / "t.json", {})
    assert files(tmp_path) == []


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs Linux's /dev/full")
def test_a_download_onto_a_full_disk_blames_the_disk_not_the_network(tmp_path, monkeypatch):
    from jeat.data import download_file

    src = tmp_path / "archive.tar.gz"
    src.write_bytes(os.urandom(1 << 16))
    cache = tmp_path / "cache"
    full_disk(monkeypatch, cache)
    with pytest.raises(EnvironmentFailure, match="no space left on the device"):
        download_file(src.as_uri(), cache / src.name, None)
    assert files(cache) == []


def _can_mount() -> bool:
    if not shutil.which("unshare") or not os.path.exists("/proc/self/ns/user"):
        return False
    probe = tempfile.mkdtemp()
    try:
        r = subprocess.run(["unshare", "-rm", "mount", "-t", "tmpfs", "tmpfs", probe],
                           capture_output=True)  # fmt: skip
        return r.returncode == 0
    finally:
        os.rmdir(probe)


@pytest.mark.skipif(not _can_mount(), reason="no user namespace here to mount file systems in")
def test_on_real_file_systems_a_read_only_mount_and_a_full_tmpfs(tmp_path, capsys, reference):
    """The issue's own runs, unsimulated: onto a read-only mount, and onto a tmpfs with room
    for one checkpoint and a half (the second's temporary file fills it)."""
    size = RunPaths(reference).checkpoint.stat().st_size
    kib = (size * 3 // 2 + 24 * 1024) // 4096 * 4
    mnt, kept = tmp_path / "mnt", tmp_path / "kept"
    mnt.mkdir()
    jeat_cmd = " ".join([sys.executable, "-m", "jeat.cli", "train", *TINY])
    script = (
        f"mount -t tmpfs -o size=64k tmpfs {mnt} && mount -o remount,ro {mnt} && "
        f"{jeat_cmd} --out {mnt}/run; echo ro=$? && umount {mnt} && "
        f"mount -t tmpfs -o size={kib}k tmpfs {mnt} && "
        f"{jeat_cmd} --out {mnt}/run; echo full=$? && cp -a {mnt}/run {kept}"
    )
    r = subprocess.run(["unshare", "-rm", "sh", "-c", script], capture_output=True, text=True)
    assert "ro=2" in r.stdout and "full=2" in r.stdout, r.stdout + r.stderr
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("jeat: error:")]
    assert len(errors) == 2 and "Traceback" not in r.stderr, r.stderr
    assert "the file system is read-only" in errors[0]
    assert "no space left on the device" in errors[1] and "--resume" in errors[1]
    assert not [f for f in files(kept) if f.endswith(".tmp")]
    assert load_checkpoint(RunPaths(kept).checkpoint)["epoch"] == 1
    code, _, err = jeat(capsys, "train", "--out", kept, "--resume", *TINY)
    assert code == 0, err
    assert same_weights(kept, reference)


# --------------------------------------------------------------------------- budgets
@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--eps", "8"], "--eps = 8 is an L-inf budget above 1"),
        (["--eps", "3/2"], "--eps = 1.5 is an L-inf budget above 1"),
        (["--norm", "l2", "--eps", "9"], "diameter of 1x8x8 images"),
        (["--attacks", "pgd5:eps=16"], "pgd5:eps=16: option eps = 16"),
        (["--attacks", "pgd5:norm=l2:eps=300"], "above 8"),
        (["--attacks", "pgd5:step_size=0"], "option step_size must be a number > 0"),
        (["--attacks", "pgd5:step_size=2"], "for 2 grey levels write 2/255"),
        (["--attacks", "sgm:source=x:step_size=-1"], "step_size must be a number > 0"),
        (["--attacks", "pgd0"], "at least 1 step"),
        (["--curve", "pgd5", "--curve-eps", "0,4"], "--curve-eps = 4"),
    ],
)
def test_budgets_nobody_meant_are_refused_where_they_are_read(
    tmp_path, capsys, reference, args, says
):
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    before = files(run)
    code, _, err = jeat(capsys, "eval", run, "--n", "10", "--quiet", *args)
    assert code == 2
    one_line(err, says)
    assert files(run) == before


def test_the_likely_intent_is_named():
    with pytest.raises(JeatError, match=r"--eps = 8 is .*; for 8 grey levels write 8/255$"):
        check_budget("linf", 8, what="--eps")
    with pytest.raises(JeatError, match="above 55.43, the diameter of 3x32x32 images"):
        check_budget("l2", 128, (3, 32, 32))  # 128/255 fits: it is named
    assert check_budget("l2", 50, (3, 32, 32)) == 50  # under the diameter: a real budget
    assert check_budget("linf", 1) == 1 and check_budget("l2", 1e6) == 1e6  # shape unknown
    for bad in (-0.1, float("nan"), float("inf")):
        with pytest.raises(JeatError, match="must be a finite number >= 0"):
            check_budget("linf", bad)
    with pytest.raises(JeatError, match="must be a number"):
        check_budget("linf", True)
    assert check_step_size("linf", 0, 0) == 0  # a zero budget: no step moves anyway
    with pytest.raises(JeatError, match="must be a number > 0"):
        check_step_size(None, 0, 0.1)
    ctx = EvalContext(image_shape=(1, 8, 8))
    from jeat.attacks import LinfBall

    with pytest.raises(JeatError, match="L-inf budget above 1"):
        LinfBall(8)
    assert build_attack(parse_attack("pgd5:eps=8/255"), LinfBall(0.1), ctx).threat.eps == 8 / 255


def test_training_budgets_are_refused_before_the_run_folder(tmp_path, capsys, monkeypatch):
    no_training(monkeypatch)
    for args, says in (
        (["--eps", "8"], "--eps = 8 is an L-inf budget above 1"),
        (["--set", "objective.attack.eps=8"], "objective.attack.eps = 8"),
        (["--set", "objective.attack.step_size=0"], "objective.attack.step_size must be"),
        (["--set", "eval.eps=4"], "eval.eps = 4"),
        (["--set", "objective.attack.norm=l2", "--set", "objective.attack.eps=10"], "diameter"),
    ):
        code, _, err = jeat(capsys, "train", "--out", tmp_path / "run", *TINY, *args)
        assert code == 2
        one_line(err, says)
        assert not (tmp_path / "run").exists()
