"""Real multi-process runs: two local processes of 4 simulated CPU devices each form one 8-device mesh.

Every process runs tests/multihost/_worker.py (``python -m tests.multihost._worker``) with
``jax.distributed.initialize(coordinator_address="127.0.0.1:<free port>", num_processes=2,
process_id=i)`` and gloo CPU collectives, on a 2x4 ('data', 'model') mesh whose 'data' axis spans
the two processes: kernels split over both axes are held whole by no process, and each process
feeds only its half of the batch. Four cases: LoRA and QLoRA on a linen model (the tiny HF GPT-2)
and on an NNX model (the tiny NNX Llama). Two waves of processes, each compiling once:

1. the pair trains every case (deltas sharded by ``jpeft.partition_specs``), saves it with
   ``jpeft.save`` from both processes, merges and exports it, then starts another save in the middle
   of which process 1 SIGKILLs both processes (a preempted job: its partial directory stays);
2. a fresh pair restores every case onto its sharded base, and so does one process of 8 devices on a
   4x2 mesh; both merge and export what they restored; that process then trains every case on one
   device (the oracle), and the pair saves again and starts a save in which process 1 SIGKILLs only
   itself (process 0 must get a JpeftError, nothing committed).

Checked: the pair's trained deltas, optimizer state and losses equal the oracle's (1e-5); both
restores are bit-exact (NumPy bytes) and see only the committed step on every process (the
preempted save's directory is on disk, never listed); ``jpeft.merge`` and ``jpeft.export_hf`` on the
pair's global arrays give the values and files of the same on one process. One test item, so that
pytest-xdist never runs two process groups at once.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from tests.multihost._worker import CASES, STEPS

ROOT = Path(__file__).resolve().parents[2]
WAVE_TIMEOUT = 600  # seconds per wave; about 40 on an idle 2-core machine
TOL = 1e-5


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Group:
    """The worker processes of the test, each logging to a file; all killed on exit."""

    def __init__(self, logs: Path) -> None:
        self.logs, self.procs = logs, {}

    def start(self, name: str, *args: str) -> subprocess.Popen:
        log = open(self.logs / f"{name}.log", "w")  # noqa: SIM115 - closed with the process
        env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
        cmd = [sys.executable, "-m", "tests.multihost._worker", *args]
        self.procs[name] = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        self.procs[name].log = log
        return self.procs[name]

    def text(self, name: str) -> str:
        return (self.logs / f"{name}.log").read_text()

    def tail(self, name: str, chars: int = 3000) -> str:
        return f"--- {name} (rc {self.procs[name].poll()}) ---\n{self.text(name)[-chars:]}"

    def wait(self, names: tuple[str, ...], deadline: float, *, watch: tuple[str, ...] = ()) -> dict[str, int]:
        """Waits until every process of ``names`` has ended; fails at once when one of ``names`` ends with
        an error or one of ``watch`` ends at all (its peers would wait on it in a barrier until the deadline)."""
        while True:
            codes = {n: self.procs[n].poll() for n in names}
            failed = [n for n in names if codes[n] not in (None, 0, -signal.SIGKILL)]
            failed += [n for n in watch if self.procs[n].poll() is not None]
            if failed:
                raise AssertionError("\n".join(self.tail(n) for n in (*failed, *names, *watch)))
            if all(c is not None for c in codes.values()):
                return codes
            if time.monotonic() > deadline:
                late = [n for n in names if codes[n] is None]
                raise AssertionError(f"{late} still run after their wave's {WAVE_TIMEOUT} s\n" + self.tail(late[0]))
            time.sleep(0.5)

    def lines(self, name: str) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.text(name).splitlines() if line.startswith("{")]

    def kill_all(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=30)
            proc.log.close()


def _pair(group: _Group, name: str, command: str, out: Path, *extra: str) -> list[str]:
    port = str(_free_port())
    for i in (0, 1):
        group.start(
            f"{name}{i}", command, "--out", str(out), "--mesh", "2x4", "--devices", "4",
            "--num-processes", "2", "--process-id", str(i), "--port", port, *extra,
        )  # fmt: skip
    return [f"{name}0", f"{name}1"]


def _arrays(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as f:
        return {k: f[k] for k in f.files}


def _max_diff(got: dict[str, np.ndarray], want: dict[str, np.ndarray], prefixes: tuple[str, ...]) -> float:
    keys = sorted(k for k in want if k.startswith(prefixes))
    assert keys and sorted(k for k in got if k.startswith(prefixes)) == keys, (sorted(got), keys)
    return max(float(np.max(np.abs(got[k].astype(np.float64) - want[k].astype(np.float64)), initial=0.0)) for k in keys)


def _same_bytes(got: dict[str, np.ndarray], want: dict[str, np.ndarray], prefixes: tuple[str, ...]) -> list[str]:
    """The keys whose dtype, shape or bytes differ."""
    keys = sorted(k for k in want if k.startswith(prefixes))
    assert keys and sorted(k for k in got if k.startswith(prefixes)) == keys, (sorted(got), keys)
    return [
        k
        for k in keys
        if (got[k].dtype, got[k].shape, got[k].tobytes()) != (want[k].dtype, want[k].shape, want[k].tobytes())
    ]


def _export(directory: Path) -> tuple[bytes, dict[str, np.ndarray]]:
    from safetensors.numpy import load_file

    return (directory / "adapter_config.json").read_bytes(), load_file(directory / "adapter_model.safetensors")


def test_two_processes_train_save_survive_a_kill_restore_merge_and_export_like_one(tmp_path):
    import jpeft.io

    group = _Group(tmp_path)
    train, oracle, again, single = (tmp_path / n for n in ("train", "oracle", "restore-pair", "restore-one"))
    start = time.monotonic()
    try:  # wave 1: the pair trains and saves; in a last save process 1 SIGKILLs both (a preempted job)
        pair = _pair(group, "train", "train", train, "--kill-in-save", "all")
        codes = group.wait(pair, time.monotonic() + WAVE_TIMEOUT)
        assert set(codes.values()) == {-signal.SIGKILL}, "\n".join(group.tail(n) for n in pair)
        assert any(r.get("event") == "killed-save" for r in group.lines(pair[0])), group.tail(pair[0])
        wave1 = time.monotonic() - start
        # wave 2: a fresh pair and one process of 8 devices (a 4x2 mesh) restore what the pair saved; the
        # pair then saves again, and process 1 SIGKILLs itself in a save: process 0 must get a JpeftError.
        fresh = _pair(group, "restore", "restore", again, "--source", str(train), "--kill-in-save", "one")
        group.start(  # and then trains every case on one device: the oracle
            "one", "restore", "--source", str(train), "--out", str(single), "--mesh", "4x2", "--devices", "8",
            "--oracle", str(oracle),
        )  # fmt: skip
        codes = group.wait((*fresh, "one"), time.monotonic() + WAVE_TIMEOUT)
        assert codes == {fresh[0]: 0, fresh[1]: -signal.SIGKILL, "one": 0}, "\n".join(group.tail(n) for n in codes)
    finally:
        group.kill_all()
    wall = time.monotonic() - start

    logs = "\n".join(group.tail(n, 1500) for n in group.procs)
    for name in (*pair, *fresh):  # every process finished (or reached the killed save)
        assert [r["case"] for r in group.lines(name) if "case" in r] == list(CASES), group.tail(name)
    assert [r["case"] for r in group.lines("one") if "case" in r] == list(CASES) * 2, group.tail("one")
    for r in (r for n in pair + fresh for r in group.lines(n) if "case" in r):
        assert (r["processes"], r["devices"], r["local_devices"]) == (2, 8, 4), r
        # Delta leaves that no process holds whole (the 4 of GPT-2's c_attn and c_fc, the Llama's q_proj and
        # v_proj). Restored over an NF4 base, deltas come back replicated on the mesh: jpeft.restore cannot
        # read a kernel's spec from its NF4 codes (see tests/test_sharding.py's _check_sharded_restore).
        assert r["split"][0] >= (0 if "step" in r and r["case"].endswith("qlora") else 4), r
    for r in (r for n in (*fresh, "one") for r in group.lines(n) if "step" in r):  # on every process
        assert (r["steps"], r["step"]) == ([STEPS], STEPS), (r, logs)

    report: dict[str, Any] = {"processes": 2, "mesh": "2x4 (data x model)", "restore_mesh": "4x2 on one process"}
    for case in CASES:
        got, want = _arrays(train / f"{case}.npz"), _arrays(oracle / f"{case}.npz")
        trained = _max_diff(got, want, ("params", "opt", "loss"))
        assert trained <= TOL, f"{case}: the pair's training differs from one process's by {trained:.3g}\n{logs}"
        ckpt = train / "ckpt" / case
        assert jpeft.io.steps(ckpt) == [STEPS], sorted(os.listdir(ckpt))
        for where in (again, single):
            restored = _arrays(where / f"{case}.npz")
            bad = _same_bytes(restored, got, ("params", "opt"))
            assert not bad, f"{case}: restored into {where.name}, not bit-exact: {bad[:5]}"
        merged_one = _arrays(single / f"{case}.npz")
        merged = _max_diff(got, merged_one, ("merged",))
        assert merged <= 1e-6, f"{case}: jpeft.merge of the pair's global arrays differs from one process's by {merged}"
        assert _max_diff(_arrays(again / f"{case}.npz"), merged_one, ("merged",)) <= 1e-6
        files = "-"
        if case != "nnx-qlora":
            config, tensors = _export(train / "export" / case)
            for where in (single, again):
                config2, tensors2 = _export(where / "export" / case)
                assert config == config2, f"{case}: adapter_config.json differs from {where.name}'s"
                bad = _same_bytes(tensors2, tensors, ("",))
                assert not bad, f"{case}: export_hf tensors differ from {where.name}'s: {bad[:5]}"
            files = f"{len(tensors)} tensors, bit-exact"
        report[case] = {"train_max_diff": trained, "merge_max_diff": merged, "export": files}
    # The preempted save left its directory, which steps() and both restores above never picked up.
    partial = [n for n in os.listdir(ckpt) if n.startswith(f"step_{STEPS + 1}")]
    assert partial, f"the killed save left no step_{STEPS + 1} directory: {sorted(os.listdir(ckpt))}"
    # The survivor of the save that lost process 1 got a JpeftError; nothing was committed.
    (failed,) = [r for r in group.lines(fresh[0]) if r.get("event") == "save-failed"]
    assert failed["error"] and "Nothing was committed" in failed["error"], failed
    assert jpeft.io.steps(again / "ckpt" / CASES[-1]) == [STEPS], sorted(os.listdir(again / "ckpt" / CASES[-1]))
    # Saved again with its optimizer state right after the restore (no step between), then restored: bit-exact.
    resaved = [r for n in fresh for r in group.lines(n) if r.get("event") == "resaved"]
    assert len(resaved) == 2 and all(r["bit_exact"] and r["leaves"] > 0 for r in resaved), resaved
    report["preempted_save_left"] = partial
    report["survivor_error_after_s"] = failed["seconds"]
    report["wall_s"] = {"wave1": round(wave1, 1), "total": round(wall, 1)}
    print(json.dumps(report, indent=1))
