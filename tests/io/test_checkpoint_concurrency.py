"""jpeft.save / jpeft.restore with real concurrent processes (issue 17 findings 1 and 2).

Workers are separate Python processes that take commands on stdin, so each one imports jax once
and a trial costs one save. Every save carries distinguishable values (``small(seed)``, and an
optimizer state filled with the seed), so a restore shows exactly which save it read: a mixed or
silently wrong load fails the test; a clear ``JpeftError`` is allowed where a race makes one right.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time

import jax.numpy as jnp
import numpy as np

import jpeft
from tests.io.test_checkpoint import ROOT, assert_trees_equal, small

WORKER = textwrap.dedent(
    """
    import os
    import sys
    import jax.numpy as jnp
    import jpeft
    from tests.io.test_checkpoint import small

    path = sys.argv[1]
    print("ready", flush=True)
    for line in sys.stdin:
        command, *args = line.split()
        if command == "save":  # save <step> <seed>: one save, reported
            step, seed = int(args[0]), int(args[1])
            method, _, peft = small(seed)
            try:
                jpeft.save(path, method, peft, step=step, opt_state={"seed": jnp.full(3, seed, jnp.float32)})
                print("ok", flush=True)
            except jpeft.JpeftError as e:
                print("JpeftError", str(e).replace("\\n", " "), flush=True)
            except Exception as e:
                print("RAW", type(e).__name__, str(e).replace("\\n", " ")[:300], flush=True)
        elif command == "overwrite":  # overwrite <stop file>: saves of step 1, seeds 2, 1, 2, ..., until the file exists
            i = 0
            while not os.path.exists(args[0]):
                seed, i = 2 - i % 2, i + 1
                method, _, peft = small(seed)
                jpeft.save(path, method, peft, step=1, overwrite=True, opt_state={"seed": jnp.full(3, seed, jnp.float32)})
            print("done", flush=True)
    """
)


def start(path: str) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-c", WORKER, path], cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline().strip() == "ready"
    return proc


def stop(*procs: subprocess.Popen) -> None:
    for proc in procs:
        proc.stdin.close()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


TEMPLATE = {"seed": jnp.zeros(3, jnp.float32)}


def test_two_processes_saving_one_step_leave_one_whole_winner(tmp_path):
    """Finding 1: orbax's temporary had a fixed name, so both writers wrote into it (mixed leaves)."""
    path = str(tmp_path)
    workers = [start(path), start(path)]
    trials = 8
    try:
        for step in range(trials):
            seeds = [100 + step, 200 + step]  # worker w saves small(seeds[w])
            for proc, seed in zip(workers, seeds, strict=True):
                proc.stdin.write(f"save {step} {seed}\n")
                proc.stdin.flush()
            replies = [proc.stdout.readline().strip() for proc in workers]
            winners = [w for w, r in enumerate(replies) if r == "ok"]
            assert len(winners) == 1, replies  # one wins ...
            loser = replies[1 - winners[0]]  # ... and the other is told clearly
            assert loser.startswith("JpeftError jpeft.save: step") or "already exists" in loser, replies
            assert "by another writer" in loser or "already exists" in loser, replies
            _, params, want = small(seeds[winners[0]])
            got = jpeft.restore(path, params, step=step, opt_state=TEMPLATE)
            assert_trees_equal(got.params, want)  # the winner's step, whole
            assert float(got.opt_state["seed"][0]) == seeds[winners[0]]
    finally:
        stop(*workers)
    assert jpeft.io.steps(path) == list(range(trials))
    assert sorted(os.listdir(path)) == sorted(f"step_{s}" for s in range(trials))  # no temporaries left


def test_restore_racing_overwrite_reads_one_version_or_fails_clearly(tmp_path):
    """Finding 2: params from one save and opt_state from the other, with no error."""
    path = str(tmp_path)
    method, params, first = small(1)
    jpeft.save(path, method, first, step=1, opt_state={"seed": jnp.full(3, 1.0, jnp.float32)})
    want = {1: first, 2: small(2)[2]}
    writer = start(path)
    reads, errors, seen = 0, [], set()
    stop_file = tmp_path.parent / f"{tmp_path.name}.stop"
    try:
        writer.stdin.write(f"overwrite {stop_file}\n")
        writer.stdin.flush()
        deadline = time.monotonic() + 60
        while (reads < 12 or len(seen) < 2) and time.monotonic() < deadline:  # the writer overwrites until told to stop
            try:
                got = jpeft.restore(path, params, step=1, opt_state=TEMPLATE)
            except jpeft.JpeftError as e:  # allowed: a clear failure
                errors.append(str(e))
                continue
            seed = int(np.asarray(got.opt_state["seed"])[0])
            assert_trees_equal(got.params, want[seed])  # params and opt_state from the same save
            reads, seen = reads + 1, seen | {seed}
        stop_file.touch()
        assert writer.stdout.readline().strip() == "done"
    finally:
        stop_file.touch()
        stop(writer)
    print(f"{reads} consistent reads (saves {sorted(seen)}), {len(errors)} clear errors")
    assert reads >= 12 and seen == {1, 2} and len(errors) <= reads, (reads, seen, errors[:3])
