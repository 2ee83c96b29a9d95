"""Multi-process training with torchrun on the CPU (gloo, 2 processes), and the on-disk data cache.

Reference for the distributed runs: the same config trained by one process. With the global
batch fixed (``train.batch_size``), both see the same augmented images in the same steps, so:

- with synchronised BatchNorm the two runs compute the same thing and the weights agree up to
  floating-point reduction order (tolerance below);
- without it, each process normalises with the statistics of its half of the batch, a different
  computation; the weights then differ by far more than that tolerance (asserted, so the
  tolerance is known to be tight enough to tell).
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import write_ellipse_dataset
from nerveseg.config import DataConfig, ModelConfig, PreprocessConfig, RunConfig, TrainConfig
from nerveseg.data.cache import load_tensor_set
from nerveseg.data.disk_cache import cache_key, load_disk_tensor_set
from nerveseg.data.samples import discover_samples
from nerveseg.training import train
from nerveseg.training.distributed import CpuSyncBatchNorm2d, convert_sync_batchnorm

TINY = json.dumps({"features": [8, 16, 32, 64, 128]})  # --model-kwargs of a small U-Net
# float32, no augmentation randomness beyond the shared generator: what is left is reduction order
SYNC_TOLERANCE = 2e-4


def _torchrun(args: list[str], nproc: int = 2, **kwargs) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "nerveseg", *args]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, **kwargs)


def _train_args(data: Path, out: Path, epochs: int, *extra: str) -> list[str]:
    return ["train", "--data", str(data), "--out", str(out), "--arch", "unet", "--size", "32", "--epochs", str(epochs),
            "--batch-size", "4", "--val-fraction", "0.25", "--augment", "shear,hflip", "--no-amp",
            "--no-channels-last", "--threads", "1", "--quiet", "--model-kwargs", TINY, *extra]


def _run(args, nproc=2, timeout=240) -> str:
    proc = _torchrun(args, nproc)
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out
    return out


def _single(data: Path, out: Path, epochs: int, *extra: str) -> None:
    from nerveseg.cli.main import main

    assert main(_train_args(data, out, epochs, *extra)) == 0


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "model.safetensors"))


def _max_weight_difference(a: Path, b: Path) -> float:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    return max(float((wa[k].float() - wb[k].float()).abs().max()) for k in wa if wa[k].is_floating_point())


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    # 14 images: 10 train, 4 validation -> an epoch of batches 4, 4, 2 (the last one splits 1 + 1)
    return write_ellipse_dataset(tmp_path_factory.mktemp("ddp") / "data", 14, height=40, width=48)


@pytest.fixture(scope="module")
def single_run(dataset, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("single") / "run"
    _single(dataset, out, 2)
    return out


def _kill_process_tree(pid: int) -> None:
    """SIGKILL a torchrun and every process under it, as a lost node would. killpg is not enough:
    the elastic agent starts each worker in a session of its own, so its workers would run on."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(stat.parent.name))
    tree, todo = [], [pid]
    while todo:
        p = todo.pop()
        tree.append(p)
        todo += children.get(p, [])
    for p in tree:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.time() + 30
    for p in tree[1:]:  # the workers, reparented once torchrun dies: wait until they are gone
        while time.time() < deadline:
            try:
                state = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()[0]
            except (OSError, IndexError):
                break
            if state in ("Z", "X"):
                break
            time.sleep(0.05)


def _ddp(data, out, epochs, *extra, nproc=2):
    return _run(_train_args(data, out, epochs, *extra), nproc=nproc)


def test_torchrun_writes_one_set_of_outputs_and_matches_one_process_with_sync_bn(dataset, single_run, tmp_path):
    synced = tmp_path / "sync"
    log = _ddp(dataset, synced, 2, "--sync-bn")
    assert log.count("trained ") == 1, log  # rank 0 reports; rank 1 is silent
    files = sorted(p.name for p in synced.iterdir())
    assert files == ["config.json", "history.csv", "last.safetensors", "model.safetensors"], files
    with (synced / "history.csv").open() as f:
        assert [r["epoch"] for r in csv.DictReader(f)] == ["1", "2"]
    single_config = json.loads((single_run / "config.json").read_text())
    ddp_config = json.loads((synced / "config.json").read_text())
    assert ddp_config["train_stems"] == single_config["train_stems"]
    assert ddp_config["train"]["sync_batchnorm"] is True
    assert _max_weight_difference(single_run, synced) < SYNC_TOLERANCE

    unsynced = tmp_path / "plain"
    _ddp(dataset, unsynced, 2)
    # each process's BatchNorm sees half the batch: a different (legitimate) computation
    assert _max_weight_difference(single_run, unsynced) > 10 * SYNC_TOLERANCE


def test_torchrun_killed_mid_run_resumes_under_torchrun(dataset, tmp_path):
    out = tmp_path / "killed"
    epochs = 10
    proc = _torchrun(_train_args(dataset, out, epochs))
    history = out / "history.csv"
    deadline = time.time() + 180
    # wait for two epochs in the history (so epoch 1's training state, written after its history row,
    # is on disk), then kill torchrun and its workers
    while time.time() < deadline:
        if history.exists() and len(history.read_text().strip().splitlines()) >= 3:
            break
        time.sleep(0.01)
    _kill_process_tree(proc.pid)
    proc.wait()
    with history.open() as f:
        done = len(list(csv.DictReader(f)))
    assert 2 <= done < epochs
    log = _run(_train_args(dataset, out, epochs, "--resume"))
    # from the last saved state: after the last history row, or one before it if the kill fell between the two writes
    assert f"resuming {out} at epoch {done + 1}/{epochs}" in log or f"resuming {out} at epoch {done}/{epochs}" in log, log
    assert log.count("trained ") == 1
    with history.open() as f:
        assert [int(r["epoch"]) for r in csv.DictReader(f)] == list(range(1, epochs + 1))
    # the resumed run is the uninterrupted one: same batches (per-epoch generators), same state
    straight = tmp_path / "straight"
    _ddp(dataset, straight, epochs)
    assert _max_weight_difference(out, straight) < SYNC_TOLERANCE
    assert not list(out.glob(".*tmp*"))


# ------------------------------------------------------------------------------------------------
# synchronised BatchNorm against the single-process computation, in one process group of one... and two


def _sync_bn_worker(rank: int, world: int, port: int, x: torch.Tensor, queue) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)
    bn = CpuSyncBatchNorm2d(3)
    bn.weight.data.uniform_(0.5, 1.5)
    bn.bias.data.uniform_(-0.5, 0.5)
    part = x[rank::world].clone().requires_grad_(True)
    y = bn(part)
    (y * torch.arange(y.numel(), dtype=y.dtype).reshape(y.shape).cos()).sum().backward()
    dist.all_reduce(bn.weight.grad)
    # numpy copies travel by value: a tensor would travel as a file descriptor that the parent can
    # only fetch while this process lives, and on a busy machine it may have exited by then
    queue.put((rank,) + tuple(t.detach().numpy().copy() for t in (y, part.grad, bn.weight.grad, bn.running_mean, bn.running_var)))
    dist.barrier()
    dist.destroy_process_group()


def test_cpu_sync_batchnorm_equals_batchnorm_on_the_whole_batch():
    import socket

    import torch.multiprocessing as mp

    torch.manual_seed(1)
    x = torch.randn(6, 3, 5, 4) * 2 + 1
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_sync_bn_worker, args=(r, 2, port, x, queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = dict((r[0], tuple(torch.from_numpy(a) for a in r[1:])) for r in (queue.get(timeout=120) for _ in procs))
    for p in procs:
        p.join(timeout=60)

    torch.manual_seed(0)
    ref = torch.nn.BatchNorm2d(3)
    ref.weight.data.uniform_(0.5, 1.5)
    ref.bias.data.uniform_(-0.5, 0.5)
    xr = x.clone().requires_grad_(True)
    y = ref(xr)
    # each rank's loss weights its own outputs the same way as the workers did
    weights = torch.zeros_like(y)
    for r in range(2):
        part = weights[r::2]
        weights[r::2] = torch.arange(part.numel(), dtype=y.dtype).reshape(part.shape).cos()
    (y * weights).sum().backward()
    for r in range(2):
        out, grad_in, grad_w, running_mean, running_var = results[r]
        torch.testing.assert_close(out, y.detach()[r::2], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(grad_in, xr.grad[r::2], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(grad_w, ref.weight.grad, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(running_mean, ref.running_mean, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(running_var, ref.running_var, atol=1e-6, rtol=1e-5)


def test_convert_sync_batchnorm_keeps_the_weights_and_is_plain_batchnorm_alone():
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU())
    model[1].running_mean.fill_(0.3)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    converted = convert_sync_batchnorm(model, torch.device("cpu"))
    assert isinstance(converted[1], CpuSyncBatchNorm2d)
    assert all(torch.equal(state[k], v) for k, v in converted.state_dict().items())
    x = torch.randn(2, 1, 8, 8)
    ref = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU())
    ref.load_state_dict(state)
    torch.testing.assert_close(converted(x), ref(x))  # no process group: ordinary BatchNorm


# ------------------------------------------------------------------------------------------------
# the on-disk cache


def test_disk_cache_holds_what_memory_holds_and_is_reused(tmp_path):
    data = write_ellipse_dataset(tmp_path / "data", 5, height=50, width=70)
    samples, _ = discover_samples(data)
    (samples[0].mask_path).write_bytes(b"not a png")  # a bad pair: reported and left out by both paths
    memory, mem_problems = load_tensor_set(samples, 32, 1)
    disk, disk_problems = load_disk_tensor_set(samples, 32, 1, cache_dir=tmp_path / "cache")
    assert len(disk) == len(memory) == 4 and disk.stems == memory.stems
    assert [str(p) for p in disk_problems] == [str(p) for p in mem_problems]
    back = disk.to_tensor_set()
    # float16 storage: rounding at most 2^-11 relative on values in [0, 1]
    torch.testing.assert_close(back.images, memory.images, atol=2.0**-11, rtol=0)
    assert torch.equal(back.masks, memory.masks) and torch.equal(back.stats, memory.stats)
    entries = list((tmp_path / "cache").iterdir())
    assert len(entries) == 1 and not list((tmp_path / "cache").glob(".*building"))
    # the same data again: the same entry, not rebuilt
    stamp = (entries[0] / "images.f16").stat().st_mtime_ns
    again, _ = load_disk_tensor_set(samples, 32, 1, cache_dir=tmp_path / "cache")
    assert again.folder == entries[0] and (entries[0] / "images.f16").stat().st_mtime_ns == stamp
    # other preprocessing, or a changed file, is another entry
    assert cache_key(samples, 64, [1]) != cache_key(samples, 32, [1])
    assert cache_key(samples, 32, [1, 2]) != cache_key(samples, 32, [1])
    before = cache_key(samples, 32, [1])
    os.utime(samples[1].image_path, ns=(1, 1))
    assert cache_key(samples, 32, [1]) != before


def test_training_from_the_disk_cache_matches_training_from_memory(tmp_path):
    data = write_ellipse_dataset(tmp_path / "data", 10, height=40, width=48)

    def config(cache: str) -> RunConfig:
        return RunConfig(model=ModelConfig("unet", {"features": [8, 16, 32, 64, 128]}), preprocess=PreprocessConfig(32),
                         data=DataConfig(str(data), label=1, val_fraction=0.2),
                         train=TrainConfig(epochs=2, augment=("shear", "hflip"), amp=False, channels_last=False,
                                           data_cache=cache, loader_workers=2))

    train(config("memory"), tmp_path / "memory", progress=False, log=lambda m: None)
    train(config("disk"), tmp_path / "disk", progress=False, log=lambda m: None, cache_dir=tmp_path / "cache")
    # same batches in the same order through the workers; images stored as float16 -> close, not equal
    assert _max_weight_difference(tmp_path / "memory", tmp_path / "disk") < 5e-3
    with (tmp_path / "disk" / "history.csv").open() as f:
        assert len(list(csv.DictReader(f))) == 2
    entries = sorted((tmp_path / "cache").iterdir())
    assert len(entries) == 2  # the training split and the validation split
    # resuming (here: running longer) a disk-cache run reuses the entries
    more = config("disk")
    more.train.epochs = 3
    logs = []
    train(more, tmp_path / "disk", resume=True, progress=False, log=logs.append, cache_dir=tmp_path / "cache")
    assert sorted((tmp_path / "cache").iterdir()) == entries
    assert sum("cache: reusing" in m for m in logs) == 2


def test_benchmark_under_torchrun_trains_each_run_once_and_reports_once(tmp_path):
    data = write_ellipse_dataset(tmp_path / "data", 8, height=40, width=48)
    out = tmp_path / "bench"
    log = _run(["benchmark", "--data", str(data), "--label", "1", "--archs", "unet", "--seeds", "1", "--folds", "2",
                "--epochs", "1", "--size", "32", "--threads", "1", "--out", str(out), "--quiet", "--no-latency"])
    assert log.count("wrote ") == 1, log
    with open(out / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert sorted(r["stem"] for r in rows) == [f"{i:03d}" for i in range(8)]  # each image validated once
    for fold in (0, 1):
        with open(out / "runs" / "unet" / f"seed0_fold{fold}" / "history.csv", newline="") as f:
            assert len(list(csv.DictReader(f))) == 1
