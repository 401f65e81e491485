"""Process fan-out (echoic.data.workers) and the feature-cache fill that uses it: no
worker configuration can hang it, a dead worker is a one-line error, a stop request or
an early exit kills the workers, and none outlives its parent."""

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from helpers import write_config

from echoic.data.workers import WorkerError, fork_map

ROOT = Path(__file__).resolve().parents[1]


def _square(x: int) -> int:
    return x * x


def _fail_on_three(x: int) -> int:
    if x == 3:
        raise ValueError("three is not allowed")
    return x


def _die_on_three(x: int) -> int:
    if x == 3:
        os._exit(7)
    return x


def _sleep_forever(x: int) -> int:
    if x > 0:
        while True:
            time.sleep(1)
    return x


def _run_script(code: str, timeout: float) -> subprocess.CompletedProcess:
    """Run `code` in a fresh interpreter; a hang fails the test instead of blocking it."""
    try:
        return subprocess.run(
            [sys.executable, "-c", textwrap.dedent(code)],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=timeout,
            start_new_session=True,  # so that a timeout's leftovers can be killed as a group
        )
    except subprocess.TimeoutExpired as expired:
        pytest.fail(f"hung for {timeout} s: {expired.stderr!r}"[-2000:])


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as stat:  # a zombie is dead too
        return stat.read().split(")")[-1].split()[0] != "Z"


@pytest.mark.parametrize("jobs", [1, 2, 3])
def test_results_come_back_in_order_for_any_jobs(jobs):
    assert list(fork_map(_square, list(range(23)), jobs)) == [x * x for x in range(23)]


def test_a_worker_error_is_one_line_naming_the_worker():
    with pytest.raises(WorkerError, match=r"echoic-worker-1: ValueError: three is not allowed"):
        list(fork_map(_fail_on_three, list(range(8)), 2))


def test_a_dead_worker_is_an_error_not_a_wait():
    start = time.monotonic()
    with pytest.raises(WorkerError, match="exit code 7"):
        list(fork_map(_die_on_three, list(range(8)), 2))
    assert time.monotonic() - start < 10


def test_a_stop_request_kills_workers_that_ignore_sigterm():
    stop_at = time.monotonic() + 0.5
    start = time.monotonic()
    results = list(
        fork_map(_sleep_forever, [0, 1, 2], 2, should_stop=lambda: time.monotonic() > stop_at)
    )
    assert results == [0]
    assert time.monotonic() - start < 5
    assert not [p for p in _children() if "echoic-worker" in p]


def _children() -> list[str]:
    own = str(os.getpid())
    names = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().split(")")
        except OSError:
            continue
        rest = fields[-1].split()
        if rest[1] == own and rest[0] != "Z":
            names.append(fields[0])
    return names


def test_leaving_the_loop_early_kills_the_workers():
    results = fork_map(_sleep_forever, [0, 1, 2, 3], 2)
    assert next(results) == 0
    results.close()  # a consumer that stops reading (break, an exception)
    assert not _children()


def test_many_runs_never_hang():
    # multiprocessing.Pool with SIGTERM-ignoring workers hung in its `with` block about
    # once in 20 runs of 11 tasks (make demo's hang); 150 runs here.
    done = _run_script(
        """
        from echoic.data.workers import fork_map
        def work(x):
            return sum(i * x for i in range(20000))
        for run in range(150):
            assert len(list(fork_map(work, list(range(11)), 2))) == 11
        print("ok")
        """,
        timeout=120,
    )
    assert done.returncode == 0 and "ok" in done.stdout, done.stderr[-2000:]


def test_workers_die_with_their_parent():
    done = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(
                """
                import os, time
                from echoic.data.workers import fork_map
                def work(x):
                    # One write each (a pipe keeps writes under 4 KiB whole): print's
                    # buffered writes from two processes once came out interleaved.
                    os.write(1, f"{os.getpid()}\\n".encode())
                    while True:
                        time.sleep(1)
                for _ in fork_map(work, [0, 1], 2):
                    pass
                """
            ),
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        workers = [int(done.stdout.readline()) for _ in range(2)]  # blocks until both started
    finally:
        done.kill()  # SIGKILL: the parent runs no cleanup at all (nor is one left behind)
    done.wait(10)
    deadline = time.monotonic() + 10
    while any(_alive(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(_alive(pid) for pid in workers)


def test_the_feature_cache_fill_never_hangs(corpus):
    # The fill that hung make demo, repeated with 2 workers and chunks of 4 utterances.
    done = _run_script(
        f"""
        import echoic.data.dataset as dataset_module
        from echoic.data.dataset import DataConfig, build_loader
        from echoic.data.manifest import read_manifest
        from echoic.data.tokenizer import CharTokenizer
        dataset_module.FILL_CHUNK = 4
        manifest = read_manifest({str(corpus / "train.jsonl")!r})
        tokenizer = CharTokenizer.train(u.text for u in manifest.utterances)
        config = DataConfig(max_frames=2500, speed_perturb=[1.0], num_workers=2, feature_cache=True)
        loader = build_loader(manifest, tokenizer, config, seed=5, train=True)
        for run in range(20):
            loader.dataset.cache.clear()
            assert loader.dataset.fill_cache(loader.sampler, 2) == len(manifest.utterances)
        print("ok")
        """,
        timeout=150,
    )
    assert done.returncode == 0 and "ok" in done.stdout, done.stderr[-2000:]


@pytest.mark.slow
def test_sigterm_to_the_process_group_during_a_cache_fill_saves_and_exits_0(tmp_path, corpus, lang):
    config = write_config(
        tmp_path,
        corpus,
        lang,
        data={"num_workers": 2, "feature_cache": True},
        model={"frontend": {"fbank": {"fbank": {"dither": 0.0}}}},
        train={"max_steps": 14, "valid_every": 4},
    )
    exp, filling = tmp_path / "exp", tmp_path / "filling"
    process = subprocess.Popen(
        [sys.executable, "-m", "echoic", "train", str(config), "--exp", str(exp), "--no-progress"],
        env={**os.environ, "ECHOIC_PAUSE_IN_CACHE_FILL": str(filling)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    deadline = time.monotonic() + 120
    while not filling.exists():
        assert process.poll() is None, process.stderr.read()[-2000:]
        assert time.monotonic() < deadline, "the cache fill never started"
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGTERM)  # like timeout(1) or a scheduler's preemption
    try:
        _, stderr = process.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        _, stderr = process.communicate()
        pytest.fail(f"training hung after SIGTERM during the feature-cache fill: {stderr[-2000:]}")
    assert process.returncode == 0, stderr[-2000:]
    assert "saved (stop (SIGTERM))" in stderr, stderr[-2000:]
