"""Checkpoints under killed processes: the last good file always loads, no temp file outlives
its process's next checkpoint operation in that folder."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from torch import nn

import gradgate as gg

# A fork server: it imports gradgate once and, per request, forks a writer that saves
# checkpoints in a loop (values = save number) until the test kills it with SIGKILL. The
# server runs no torch op before forking, so the fork is safe; each kill costs milliseconds.
_SERVER = textwrap.dedent(
    """
    import os, sys
    import torch
    from torch import nn
    import gradgate as gg

    def model():
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(4, 4), nn.Linear(512, 1024))
        gg.freeze(net, "0")
        return net

    for line in sys.stdin:
        folder = line.strip()
        pid = os.fork()
        if pid == 0:
            torch.set_num_threads(1)
            net = model()
            k = int(open(os.path.join(folder, "next")).read())
            while True:
                with torch.no_grad():
                    for p in gg.trainable_parameters(net):
                        p.fill_(k)
                gg.save_trainable(net, os.path.join(folder, "ckpt.safetensors"))
                k += 1
        print(pid, flush=True)
        os.waitpid(pid, 0)
        print("reaped", flush=True)
    """
)


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 4), nn.Linear(512, 1024))
    gg.freeze(net, "0")
    return net


def _temps(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork and SIGKILL")
def test_saves_killed_at_random_points(tmp_path: Path) -> None:
    rng = random.Random(1234)
    path = tmp_path / "ckpt.safetensors"
    net = _model()
    with torch.no_grad():
        for p in gg.trainable_parameters(net):
            p.fill_(0)
    gg.save_trainable(net, path)  # the first good checkpoint: value 0
    (tmp_path / "next").write_text("1")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    server = subprocess.Popen(
        [sys.executable, "-c", _SERVER],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert server.stdin is not None and server.stdout is not None
    last = 0
    left_behind = 0
    target = _model()
    try:
        # At least 20 kills; more (up to 200) until some saves completed and some
        # kills landed mid-write, however slow or loaded the machine is.
        for kills in range(200):
            if kills >= 20 and last > 0 and left_behind > 0:
                break
            server.stdin.write(f"{tmp_path}\n")
            server.stdin.flush()
            pid = int(server.stdout.readline())
            # Random points: during start-up, the digest, the write or the rename.
            time.sleep(rng.uniform(0.0, 0.25))
            os.kill(pid, signal.SIGKILL)
            assert server.stdout.readline().strip() == "reaped"
            left_behind += bool(_temps(tmp_path))
            gg.load_trainable(target, path)  # never a torn file
            values = {
                float(v) for p in gg.trainable_parameters(target) for v in p.detach().unique()
            }
            assert len(values) == 1  # one whole save, not a mix of two
            k = int(values.pop())
            assert k >= last
            last = k
            assert _temps(tmp_path) == []  # the load removed the dead writer's temp file
            (tmp_path / "next").write_text(str(k + 1))
    finally:
        server.kill()
        server.wait()
    assert last > 0  # some saves completed
    assert left_behind > 0  # and some kills landed mid-write (the case under test)


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_only_temp_files_of_dead_processes_on_this_host_are_removed(tmp_path: Path) -> None:
    import socket

    host = socket.gethostname()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        dead = tmp_path / f"m.safetensors.gg-{_dead_pid()}@{host}.abc123.tmp"
        live = tmp_path / f"m.safetensors.gg-{sleeper.pid}@{host}.abc123.tmp"
        other_host = tmp_path / f"m.safetensors.gg-{_dead_pid()}@not-{host}.abc123.tmp"
        foreign = tmp_path / "notes.tmp"
        for p in (dead, live, other_host, foreign):
            p.write_bytes(b"x" * 100)
        net = _model()
        gg.save_trainable(net, tmp_path / "m.safetensors")
        assert not dead.exists()
        assert live.exists() and other_host.exists() and foreign.exists()
        dead2 = tmp_path / f"x.gg-{_dead_pid()}@{host}.zz.tmp"
        dead2.write_bytes(b"x")
        gg.load_trainable(net, tmp_path / "m.safetensors")  # a load cleans up too
        assert not dead2.exists() and live.exists()
    finally:
        sleeper.kill()
        sleeper.wait()


def test_a_failed_save_leaves_the_previous_file_and_no_temp(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import safetensors.torch

    net = _model()
    path = gg.save_trainable(net, tmp_path / "m.safetensors")
    good = path.read_bytes()

    def disk_full(*args: object, **kwargs: object) -> None:
        Path(str(args[1])).write_bytes(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", disk_full)
    with torch.no_grad():
        for p in gg.trainable_parameters(net):
            p.add_(1)
    with pytest.raises(OSError, match="No space left"):
        gg.save_trainable(net, path)
    assert path.read_bytes() == good and _temps(tmp_path) == []


def test_a_truncated_file_at_every_length_is_refused(tmp_path: Path) -> None:
    small = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    gg.freeze(small, "0")
    path = gg.save_trainable(small, tmp_path / "s.safetensors")
    good = path.read_bytes()
    before = gg.fingerprint(small)
    rng = random.Random(7)
    lengths = [*range(64), *rng.sample(range(64, len(good)), 120)]
    for n in lengths:  # inside the length field, the header, and the tensor bytes
        path.write_bytes(good[:n])
        with pytest.raises(gg.CheckpointError):
            gg.load_trainable(small, path)
    assert gg.fingerprint(small) == before
