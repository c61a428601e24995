"""Nothing lost, nothing silent: NaN weights, corrupt or tampered checkpoints, two runs on one folder, kill -9."""
import json
import os
import random
import re
import shutil
import socket
import struct
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

import train
from jepa import run_lock
from jepa.checkpoint import (CheckpointError, CorruptCheckpointError, NonFiniteWeightsError, checkpoint_dirs,
                             discard_dir, read_train_state, remove_stale_folders, verify_files)
from jepa.config import ConfigError
from jepa.reader import EncoderReadError, load_checkpoint_encoder
from jepa.trainer import Trainer

from conftest import REPO, TINY, make_subset

BASE = TINY + ["data.batch_size=3", "monitor.knn_every=0", "trainer.checkpoint_every=2", "trainer.keep_checkpoints=5"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """3 classes x 2 train / 1 val real images: 2 batches of 3 per epoch."""
    return make_subset(tmp_path_factory.mktemp("faults_data"), 2, 1, classes=3)


def run(data, out, *overrides):
    return train.main(BASE + [f"data.root={data}", f"trainer.output_dir={out}", *overrides])


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory):
    """A pristine run folder with checkpoint-00000002 and checkpoint-00000004 (tests copy it)."""
    out = tmp_path_factory.mktemp("faults_run") / "run"
    run(data, out, "trainer.max_steps=4")
    return out


@pytest.fixture
def run_dir(trained, tmp_path):
    return shutil.copytree(trained, tmp_path / "run")


def nonfinite(ckpt) -> int:
    """Non-finite values in the model and teacher weights of a checkpoint."""
    files = [p for p in ckpt.glob("*.safetensors") if not p.name.startswith("rng_state")]
    return sum(int((~torch.isfinite(t)).sum()) for p in files for t in load_file(str(p)).values()
               if t.is_floating_point())


def overwrite_middle(path, size=16384):
    """16 KB of plausible floats over the middle of a file: same size, still a valid safetensors file."""
    with open(path, "r+b") as fh:
        fh.seek(os.path.getsize(path) // 2)
        fh.write(struct.pack(f"{size // 4}f", *([0.01] * (size // 4))))


# ------------------------------------------------------------------------------------------------ 1. NaN weights
DIVERGE = ("trainer.checkpoint_every=1", "trainer.keep_checkpoints=1", "trainer.log_every=100",
           "optim.warmup_steps=0")


def test_diverged_run_never_leaves_a_nonfinite_checkpoint(data, tmp_path):
    """lr 1e3: the weights or the loss turn non-finite within a few steps (which first depends on the numerics);
    either way the one checkpoint kept (keep_checkpoints=1) is finite and intact, and the error names it."""
    with pytest.raises(FloatingPointError, match=r"last good checkpoint is '.*checkpoint-\d{8}'"):
        run(data, tmp_path, "trainer.max_steps=10", "optim.lr=1e3", "optim.start_lr=1e3", *DIVERGE)
    dirs = checkpoint_dirs(tmp_path)
    assert len(dirs) == 1 and nonfinite(dirs[0]) == 0 and verify_files(dirs[0])
    assert not (tmp_path / run_lock.LOCK_NAME).exists()  # released on the exception


def test_a_step_to_infinite_weights_writes_no_checkpoint(data, tmp_path):
    """The loss is read only every log_every steps; the weights of a checkpoint are checked whatever the interval:
    here the first optimizer step already makes them infinite, while its loss was finite."""
    with pytest.raises(NonFiniteWeightsError, match=r"not finite after step 1 .*checkpoint-00000001 was not written"
                                                    r".*No checkpoint was written yet"):
        run(data, tmp_path, "trainer.max_steps=10", "optim.lr=inf", "optim.start_lr=inf", *DIVERGE)
    assert checkpoint_dirs(tmp_path) == [] and not list(tmp_path.glob(".tmp-*"))


def test_nan_weights_error_names_the_way_out_and_it_works(data, tmp_path, monkeypatch, caplog):
    """Weights turning NaN at a checkpoint step: no checkpoint, the good one kept (keep_checkpoints=1), and the advice
    (resume with a lower optim.lr / optim.grad_clip) is accepted by the resume config check."""
    run(data, tmp_path, "trainer.max_steps=2", "trainer.keep_checkpoints=1")
    step = Trainer._train_step

    def poisoned(self, batches, sums):  # the last optimizer step of the window blows a teacher up
        samples = step(self, batches, sums)
        if self.state.step == 3:
            next(iter(self.teachers.values())).state_dict()["norm.weight"].fill_(float("nan"))
        return samples

    monkeypatch.setattr(Trainer, "_train_step", poisoned)
    with pytest.raises(NonFiniteWeightsError, match=r"step 3 \(1 tensors, e.g. \['target_encoder.norm.weight'\]\).*"
                                                    r"resume from it with lower optim.lr"):
        run(data, tmp_path, "trainer.max_steps=4", "trainer.checkpoint_every=1", "trainer.keep_checkpoints=1",
            "trainer.log_every=100")
    assert [p.name for p in checkpoint_dirs(tmp_path)] == ["checkpoint-00000002"]
    monkeypatch.setattr(Trainer, "_train_step", step)
    run(data, tmp_path, "trainer.max_steps=4", "optim.lr=5e-4", "optim.grad_clip=1.0")
    assert "optim.lr 0.001 -> 0.0005" in caplog.text and "optim.grad_clip 0.0 -> 1.0" in caplog.text
    assert nonfinite(tmp_path / "checkpoint-00000004") == 0


# ------------------------------------------------------------------------------------------------ 5. checksums
@pytest.mark.parametrize("name", ["model.safetensors", "target_encoder.safetensors", "optimizer.bin",
                                  "random_states_0.pkl", "train_state.json"])
def test_every_file_is_checksummed(run_dir, name):
    ckpt = run_dir / "checkpoint-00000004"
    assert verify_files(ckpt)
    if name.endswith(".json"):  # a plausible edit: same keys, another epoch
        state = json.loads((ckpt / name).read_text())
        (ckpt / name).write_text(json.dumps({**state, "epoch": state["epoch"] + 1}, indent=2))
    else:
        overwrite_middle(ckpt / name, size=64)
    with pytest.raises(CorruptCheckpointError, match=rf"checkpoint '.*checkpoint-00000004' .*'{name}' does not "
                                                     rf"match its sha256"):
        verify_files(ckpt)


def test_corrupt_newest_checkpoint_stops_resume_naming_the_intact_one(data, run_dir):
    ckpt = run_dir / "checkpoint-00000004"
    overwrite_middle(ckpt / "model.safetensors")
    with pytest.raises(CorruptCheckpointError, match=r"(?s)checkpoint-00000004' is corrupt.*'model.safetensors' "
                                                     r"does not match.*checkpoint-00000002' is intact"):
        run(data, run_dir, "trainer.max_steps=6")
    # the advice: move the corrupt one away and run again
    os.replace(ckpt, run_dir / "corrupt-checkpoint-00000004")
    state = run(data, run_dir, "trainer.max_steps=3")
    assert state["step"] == 3


def test_eval_and_export_reader_verifies_the_files_it_reads(run_dir):
    overwrite_middle(run_dir / "checkpoint-00000004" / "target_encoder.safetensors")
    with pytest.raises(EncoderReadError, match=r"checkpoint-00000004' is corrupt.*'target_encoder.safetensors'"):
        load_checkpoint_encoder(run_dir)  # `jepa eval` and `jepa export` both read through it
    load_checkpoint_encoder(run_dir, "context")  # model.safetensors is intact


def test_checkpoint_without_checksums_loads_with_a_warning(data, run_dir, caplog):
    (run_dir / "checkpoint-00000004" / "checksums.json").unlink()
    load_checkpoint_encoder(run_dir)
    assert "has no checksums.json (written by an older version)" in caplog.text
    assert run(data, run_dir, "trainer.max_steps=5")["step"] == 5
    assert verify_files(run_dir / "checkpoint-00000005")  # new checkpoints have them


# ------------------------------------------------------------------------------------------------ 9. bad files
@pytest.mark.parametrize("edit, message", [
    (lambda s: s.pop("epoch"), r"train_state.json' has no 'epoch'"),
    (lambda s: s.update(step=-4), r"'step' must be an integer >= 0, got -4"),
    (lambda s: s.update(step=6), r"'step' is 6 but the folder is 'checkpoint-00000004'"),
    (lambda s: s["schedules"].pop("lr"), r"'schedules.lr.current' must be an integer >= 0, got None"),
])
def test_train_state_is_validated(run_dir, edit, message):
    file = run_dir / "checkpoint-00000004" / "train_state.json"
    state = json.loads(file.read_text())
    edit(state)
    file.write_text(json.dumps(state))
    with pytest.raises(CheckpointError, match=message):
        read_train_state(file.parent, ["lr", "wd", "momentum"])


def test_negative_step_through_resume(data, run_dir):
    ckpt = run_dir / "checkpoint-00000004"
    (ckpt / "checksums.json").unlink()  # an old-format checkpoint: nothing else would catch it
    state = json.loads((ckpt / "train_state.json").read_text())
    (ckpt / "train_state.json").write_text(json.dumps({**state, "step": -4}))
    with pytest.raises(CheckpointError, match=r"train_state.json': 'step' must be an integer >= 0, got -4"):
        run(data, run_dir, "trainer.max_steps=6")


def test_yaml_error_in_a_checkpoint_config_names_file_and_line(data, run_dir):
    ckpt = run_dir / "checkpoint-00000004"
    (ckpt / "checksums.json").unlink()
    (ckpt / "config.yaml").write_text("method: ijepa\nmodel:\n  depth: [2\n  embed_dim: 64\n")
    with pytest.raises(CheckpointError, match=r"checkpoint-00000004/config.yaml' \(line \d\)"):
        run(data, run_dir, "trainer.max_steps=6")
    with pytest.raises(EncoderReadError, match=r"checkpoint-00000004/config.yaml' \(line \d\)"):
        load_checkpoint_encoder(run_dir)


def test_output_dir_that_is_a_file(data, tmp_path):
    (tmp_path / "run").write_text("")
    with pytest.raises(ConfigError, match=r"'trainer.output_dir' is '.*run', which is a file"):
        run(data, tmp_path / "run", "trainer.max_steps=1")


# ------------------------------------------------------------------------------------------------ 10. RNG, deletion
def test_missing_rng_state_stops_resume(data, run_dir):
    (run_dir / "checkpoint-00000004" / "random_states_0.pkl").unlink()
    with pytest.raises(CheckpointError, match=r"no RNG state for process 0 \(missing \['random_states_0.pkl'\]\); "
                                              r"exact resume needs it"):
        run(data, run_dir, "trainer.max_steps=6")


def test_deletion_cut_short_leaves_no_half_checkpoint(run_dir, monkeypatch):
    old = run_dir / "checkpoint-00000002"
    rmtree = shutil.rmtree

    def killed_midway(path, *args, **kwargs):
        (path / "model.safetensors").unlink()
        raise KeyboardInterrupt

    monkeypatch.setattr(shutil, "rmtree", killed_midway)
    with pytest.raises(KeyboardInterrupt):
        discard_dir(old)
    monkeypatch.setattr(shutil, "rmtree", rmtree)
    assert [p.name for p in checkpoint_dirs(run_dir)] == ["checkpoint-00000004"]
    (run_dir / ".tmp-checkpoint-00000006").mkdir()
    assert [p.name for p in remove_stale_folders(run_dir)] == [".del-checkpoint-00000002", ".tmp-checkpoint-00000006"]
    assert not any(p.name.startswith(".") for p in run_dir.iterdir())


# ------------------------------------------------------------------------------------------------ 3. run lock
def test_second_run_on_a_locked_folder_stops_and_the_first_is_untouched(data, run_dir):
    lock, fd = run_lock.acquire(run_dir)  # the first run, alive
    record = lock.read_text()
    try:
        host = re.escape(socket.gethostname())
        with pytest.raises(run_lock.RunLockError, match=rf"in use by another run \(pid {os.getpid()} on host "
                                                        rf"'{host}'.*lock file '.*run.lock'"):
            run(data, run_dir, "trainer.max_steps=6", "trainer.seed=1")
        assert lock.read_text() == record
        assert [p.name for p in checkpoint_dirs(run_dir)] == ["checkpoint-00000002", "checkpoint-00000004"]
    finally:
        run_lock.release(lock, fd)
    assert not lock.exists()


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_stale_lock_without_flock_is_judged_by_its_record(tmp_path, caplog):
    """The fallback for filesystems without flock: a dead pid of this host is taken over; a live one is not."""
    lock = tmp_path / run_lock.LOCK_NAME
    lock.write_text(json.dumps({**run_lock.holder_record(), "pid": dead_pid()}))
    assert run_lock._acquire_by_record(lock) == lock
    assert "took over the lock" in caplog.text and json.loads(lock.read_text())["pid"] == os.getpid()
    with pytest.raises(run_lock.RunLockError, match=f"pid {os.getpid()}"):
        run_lock._acquire_by_record(lock)
    lock.write_text(json.dumps({**run_lock.holder_record(), "host": "elsewhere", "pid": dead_pid()}))
    with pytest.raises(run_lock.RunLockError, match="on host 'elsewhere'.*delete '.*run.lock' by hand"):
        run_lock._acquire_by_record(lock)


# ------------------------------------------------------------------------------------------------ kill -9
def start_run(data, out):
    args = BASE + [f"data.root={data}", f"trainer.output_dir={out}", "trainer.max_steps=500",
                   "trainer.checkpoint_every=1", "trainer.keep_checkpoints=2"]
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, str(REPO / "train.py"), *args], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def wait_for_a_checkpoint(out, proc, timeout=120.0):
    """Until the run in ``out`` has written a checkpoint (any: keep_checkpoints deletes the first ones)."""
    start = time.monotonic()
    while not checkpoint_dirs(out):
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        assert time.monotonic() - start < timeout, f"no checkpoint appeared in {out}"
        time.sleep(0.02)


def test_kill_9_at_any_time_leaves_only_complete_checkpoints(data, tmp_path, caplog):
    """Two runs killed with SIGKILL at random moments of their checkpointing; a second run on a live one's folder
    stops; after the kills every checkpoint-* verifies and the next run resumes from the newest."""
    rng = random.Random()
    delays = [rng.uniform(0.0, 0.25), rng.uniform(0.25, 0.7)]
    outs = [tmp_path / "a", tmp_path / "b"]
    procs = [start_run(data, out) for out in outs]
    try:
        for out, proc in zip(outs, procs):
            wait_for_a_checkpoint(out, proc)
        with pytest.raises(run_lock.RunLockError, match=f"pid {procs[0].pid}"):
            run(data, outs[0], "trainer.max_steps=3", "trainer.seed=1")
        assert procs[0].poll() is None
        for delay, proc in zip(delays, procs):
            time.sleep(delay)
            proc.kill()
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
    for out in outs:
        dirs = checkpoint_dirs(out)
        assert dirs, f"delays {delays}"
        for ckpt in dirs:
            assert verify_files(ckpt), f"{ckpt} (delays {delays})"
        newest = int(dirs[-1].name.split("-")[1])
        state = run(data, out, f"trainer.max_steps={newest + 1}", "trainer.checkpoint_every=1",
                    "trainer.keep_checkpoints=2")
        assert state["step"] == newest + 1, f"delays {delays}"
        assert not any(p.name.startswith((".tmp-", ".del-")) for p in out.iterdir())
    assert "took over the lock" in caplog.text
