"""One owner per workdir (detr_jax.runtime.workdir_lock): a second run is refused at once naming the
holder, touching nothing, and the first one finishes intact; the kernel frees the lock
when its holder is killed, even while a forked child of it lives on."""

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import pytest

from conftest import REPO, cli_overrides
from detr_jax.runtime.workdir_lock import LOCK_FILE, WorkdirInUse, WorkdirLock, held_by_run


def refusal_pattern(workdir, pid: int) -> str:
    return f"{workdir} is in use by another training run (host {socket.gethostname()}, pid {pid}, since "


def test_a_second_hold_is_refused_naming_the_holder_until_the_first_ends(tmp_path):
    with held_by_run(tmp_path):
        with pytest.raises(WorkdirInUse) as refused:
            WorkdirLock(tmp_path).acquire()  # in this process too: a POSIX lock would let it through
        assert str(refused.value).startswith(refusal_pattern(tmp_path, os.getpid()))
        assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
    lock = WorkdirLock(tmp_path)
    lock.acquire()
    lock.release()


HOLDER = textwrap.dedent("""
    import os, sys, time
    from detr_jax.runtime.workdir_lock import WorkdirLock
    WorkdirLock(sys.argv[1]).acquire()
    if os.fork() == 0:  # a child that outlives its parent (as a forked worker would)
        time.sleep(60)
        os._exit(0)
    print("held", flush=True)
    time.sleep(60)
""")


def test_the_lock_is_free_once_its_holder_is_killed(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path)], stdout=subprocess.PIPE, text=True,
                              env=dict(os.environ, JAX_PLATFORMS="cpu"), start_new_session=True)
    try:
        assert holder.stdout.readline() == "held\n"
        with pytest.raises(WorkdirInUse, match=f"pid {holder.pid}, since "):
            WorkdirLock(tmp_path).acquire()
        holder.send_signal(signal.SIGKILL)
        holder.wait()
        lock = WorkdirLock(tmp_path)
        lock.acquire()  # while the forked child still sleeps
        lock.release()
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(holder.pid, signal.SIGKILL)  # the forked child (in the holder's process group)


# The first run: 4 steps of 4 images, an evaluation (a stand-in) after steps 2 and 4; the
# first waits for the file "go" beside the workdir, so that the second run meets it running.
FIRST = textwrap.dedent("""
    import pathlib, sys, time
    sys.path.insert(0, "tests")
    from conftest import tiny_config
    from detr_jax.train.trainer import train
    workdir = pathlib.Path(sys.argv[1])
    def evaluate(variables, step):
        (workdir.parent / f"evaluating_{step}").touch()
        deadline = time.time() + 300
        while not (workdir.parent / "go").exists() and time.time() < deadline:
            time.sleep(0.05)
        return {"AP": 0.5}
    train(tiny_config(**{"train.num_steps": 4, "data.synthetic_train_examples": 8, "train.eval_every_epochs": 1,
                         "train.checkpoint_every_steps": 100}), workdir, eval_fn=evaluate, show_progress=False)
""")


def test_a_second_train_on_a_running_workdir_is_refused_at_once_and_the_first_finishes_intact(tmp_path):
    workdir = tmp_path / "run"
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    first = subprocess.Popen([sys.executable, "-c", FIRST, str(workdir)], cwd=REPO, env=env, text=True,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 300
        while not (tmp_path / "evaluating_2").exists() and time.time() < deadline and first.poll() is None:
            time.sleep(0.05)
        assert (tmp_path / "evaluating_2").exists(), first.stderr.read()[-3000:] if first.poll() is not None else ""
        before = {p: p.read_bytes() for p in workdir.rglob("*")
                  if p.is_file() and "tensorboard" not in p.parts and "checkpoints" not in p.parts}
        start = time.time()
        second = subprocess.run(
            [sys.executable, "-m", "detr_jax.cli", "train", "--config", "synthetic_tiny", "--workdir", str(workdir),
             "--no_progress", *cli_overrides(**{"train.num_steps": 4, "data.synthetic_train_examples": 8,
                                                "train.eval_every_epochs": 0})],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
        elapsed = time.time() - start
        assert first.poll() is None, "the first run ended before the second one started; nothing was tested"
        assert second.returncode == 1, second.stderr[-3000:]
        refusal = [line for line in second.stderr.splitlines() if "WorkdirInUse" in line]
        assert len(refusal) == 1 and "Traceback" not in second.stderr, second.stderr[-3000:]
        assert refusal[0].startswith("detr-jax train: WorkdirInUse: " + refusal_pattern(workdir, first.pid))
        assert elapsed < 60, elapsed
        assert {p: p.read_bytes() for p in before} == before  # the second run wrote nothing
        (tmp_path / "go").touch()
        _, stderr = first.communicate(timeout=300)
    finally:
        first.kill()
    assert first.returncode == 0, stderr[-3000:]
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4]
    assert [r["step"] for r in rows if "eval_AP" in r] == [2, 4]
    assert sorted(int(p.name) for p in (workdir / "checkpoints").iterdir()) == [2, 4]
