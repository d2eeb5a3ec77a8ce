"""Scale out (farm/): candidates on a local Ray instance started by these tests, and pools of real SSH "boards"
(OpenSSH servers on 127.0.0.1, tests/sshd.py) that share a build's benchmarks and survive one being stopped."""

from __future__ import annotations

import json
import logging
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import TINY_CNN
from sshd import free_port, make_server, sshd_available

from edgeprune.backends import get_backend
from edgeprune.device import DeviceError, LocalDevice, open_device
from edgeprune.errors import BadInput, BudgetNotMet
from edgeprune.farm.executor import EXECUTORS_HELP, make_executor
from edgeprune.farm.pool import DevicePool
from edgeprune.jobs import plan_jobs, run_jobs
from edgeprune.model import load_model
from edgeprune.pipeline import BuildOptions, build
from edgeprune.target import BenchmarkSettings, Budget, load_target

ray = pytest.importorskip("ray")
TINY = TINY_CNN
QUICK = BenchmarkSettings(warmup=2, iterations=10, windows=1, min_timed_s=0.0, min_warmup_s=0.0)
needs_sshd = pytest.mark.skipif(not sshd_available(), reason="needs /usr/sbin/sshd (apt-get install openssh-server)")


@pytest.fixture(scope="module")
def ray_instance():
    """One local Ray instance of two CPUs for the module: RayExecutor joins it instead of starting its own."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
    yield
    ray.shutdown()


def _build(tmp_path: Path, name: str, **options) -> dict:
    with pytest.MonkeyPatch.context() as patch:  # each build starts from no measurement; the session's cache after
        patch.setenv("EDGEPRUNE_CACHE", str(tmp_path / f"cache-{name}"))
        return build(BuildOptions(model=TINY, out=tmp_path / name, **options), say=lambda _: None)


def test_bad_executor_and_in_flight_are_one_line_errors(tmp_path):
    """First in this file: the address check runs only where no Ray is started yet (a build on a worker joins
    the worker's own Ray, whatever address it names), and the other tests leave a module-wide instance running."""
    assert not ray.is_initialized()
    with pytest.raises(BadInput, match="unknown --executor 'spark'; use local"):
        make_executor("spark")
    port = free_port()  # nothing listens there: refused in seconds, not after Ray's minutes of retries
    for spec in (f"ray://127.0.0.1:{port}", f"ray:127.0.0.1:{port}"):
        with pytest.raises(BadInput, match=f"nothing answers at .*127.0.0.1:{port}.*is the Ray cluster up"):
            make_executor(spec)
    with pytest.raises(BadInput, match="expected HOST:PORT"):
        make_executor("ray:head")
    (tmp_path / "edgeprune.toml").write_text(
        f'model = "{TINY}"\nexecutor = "spark"\n[[targets]]\nname = "jetson-orin"\n[[targets]]\nname = "arm-tflite"\n'
    )
    jobs, _ = plan_jobs({"out": str(tmp_path / "out")}, {}, tmp_path / "edgeprune.toml")
    outcomes = [(code, message) for _, code, _, message in run_jobs(jobs, lambda _: None, announce=True)]
    assert outcomes == [(2, "unknown --executor 'spark'; use " + EXECUTORS_HELP)] * 2
    with pytest.raises(BadInput, match="--in-flight must be at least 1"):
        build(BuildOptions(model=TINY, out=tmp_path / "o", in_flight=0), say=lambda _: None)
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_candidates_on_ray_give_the_same_build_as_in_this_process(ray_instance, tmp_path):
    """Two candidates per round, on Ray workers or one after another here: the same rounds and the same plan.
    jetson-orin's latencies are the roofline estimate (no TensorRT here), so both runs see the same figures."""
    common = dict(target="jetson-orin", in_flight=2, recover_steps=0, budget=Budget(speedup=2.0))
    here = _build(tmp_path, "here", **common)
    on_ray = _build(tmp_path, "ray", executor="ray", **common)
    assert on_ray["executor"]["name"].startswith("ray") and here["executor"]["name"] == "local"
    assert [i["step"] for i in here["iterations"]][:2] == [1, 1]  # two candidates in the first round
    assert here["iterations"] == on_ray["iterations"]
    assert (tmp_path / "here" / "plan.json").read_bytes() == (tmp_path / "ray" / "plan.json").read_bytes()
    # On Ray the device is held by an actor: every benchmark of the build went through it.
    assert on_ray["device_pool"][0]["runs"] >= len(on_ray["iterations"]) + 2  # + the baseline and the final one


@pytest.mark.slow
def test_a_task_error_on_ray_is_the_one_line_error_it_raised(ray_instance):
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers do not have tests/ on their path
    executor = make_executor("ray")
    with pytest.raises(BadInput, match=r"^--in-flight must be at least 1, got 0$"):
        executor.map(_fails, None, [0])


def _fails(_, value):
    raise BadInput(f"--in-flight must be at least 1, got {value}")


@pytest.mark.slow
def test_a_config_builds_its_targets_at_once_on_ray(ray_instance, tmp_path, private_cache):
    """Two targets of one config, each built in a Ray task of its own: both folders complete, reports in order."""
    (tmp_path / "edgeprune.toml").write_text(
        f'model = "{TINY}"\nrecover_steps = 0\nexecutor = "ray"\n'
        '[[targets]]\nname = "jetson-orin"\nspeedup = 1.5\n[[targets]]\nname = "jetson-orin-nano"\nspeedup = 1.5\n'
    )
    jobs, _ = plan_jobs({"out": str(tmp_path / "out")}, {}, tmp_path / "edgeprune.toml")
    said = []
    results = run_jobs(jobs, said.append, announce=True)
    assert said[0] == "building 2 targets at once on ray (local instance): jetson-orin, jetson-orin-nano"
    assert [(options.target, code, message) for options, code, _, message in results] == [
        ("jetson-orin", 0, None), ("jetson-orin-nano", 0, None)]  # fmt: skip
    assert [report["target"] for _, _, report, _ in results] == ["jetson-orin", "jetson-orin-nano"]
    for name in ("jetson-orin", "jetson-orin-nano"):
        assert json.loads((tmp_path / "out" / name / "report.json").read_text())["validation"]["ok"]


@pytest.fixture
def boards(tmp_path):
    """Two SSH "boards" on 127.0.0.1; the second logs every accepted connection, so a test can stop it mid-build."""
    servers = [make_server(tmp_path / "a"), make_server(tmp_path / "b")]
    config = servers[1].folder / "sshd_config"
    config.write_text(config.read_text().replace("LogLevel ERROR", "LogLevel INFO"))
    for server in servers:
        server.start()
    yield servers
    for server in servers:
        server.stop()


def _stop_after_connections(server, count: int) -> threading.Thread:
    """Stop ``server`` once it has accepted ``count`` connections (or after a minute): a board lost mid-build."""

    def watch() -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if (server.folder / "sshd.log").read_text().count("Accepted publickey") >= count:
                break
            time.sleep(0.02)
        server.stop()

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


@pytest.mark.slow
@needs_sshd
def test_a_pool_shares_benchmarks_and_sets_aside_a_board_that_stops(boards, tmp_path):
    """In this process: benchmarks go to the least used idle board; one stopped, the other answers the rest."""
    target = replace(load_target("x86-openvino"), benchmark=QUICK)
    shape = (1, 3, 32, 32)
    model = load_model(TINY, input_shape=shape).module
    (tmp_path / "artifact").mkdir()
    artifact = get_backend("openvino").export(model, torch.zeros(shape), tmp_path / "artifact", target)
    pool = open_device(",".join(server.url() for server in boards))
    for _ in range(2):
        get_backend("openvino").benchmark(artifact, shape, target, pool)
    assert [s["runs"] for s in pool.status()] == [1, 1]
    boards[1].stop()
    for _ in range(3):
        get_backend("openvino").benchmark(artifact, shape, target, pool)
    status = pool.status()
    assert status[0]["runs"] == 4 and status[0]["failed"] is None
    assert status[1]["runs"] == 1 and "step 'connect' failed" in status[1]["failed"]
    boards[0].stop()
    with pytest.raises(DeviceError, match="every device of the pool failed"):
        get_backend("openvino").benchmark(artifact, shape, target, pool)


@pytest.mark.slow
@needs_sshd
def test_a_build_on_ray_survives_a_board_stopped_mid_build(ray_instance, boards, tmp_path):
    """Ray workers, two candidates per round, a pool of two boards; the second is stopped at its second connection
    (the first is the build's check that it is reachable). The build completes on the first board, and the report
    says which board failed and why."""
    quick = tmp_path / "x86-openvino.toml"  # with a short benchmark: the test is about the pool
    profile = Path(load_target("x86-openvino").path).read_text().split("[benchmark]")[0]
    quick.write_text(profile + "[benchmark]\nwarmup = 2\niterations = 20\nwindows = 1\nmin_timed_s = 0.05\n")
    watcher = _stop_after_connections(boards[1], 2)
    devices = ",".join(s.url() for s in boards)
    try:
        # 1.15x, not 1.3x: on a slow day the tiny model's two rounds reached 1.28x at best (0.193 ms against 0.191)
        # and the build shipped nothing, which says nothing of the pool (fresh clone, 2026-12-03).
        report = _build(tmp_path, "out", target=str(quick), device=devices, executor="ray", in_flight=2,
                        budget=Budget(speedup=1.15), recover_steps=0, max_rounds=2)  # fmt: skip
    except BudgetNotMet as exc:  # the final measurement missed on a busy machine: the pool is what is tested here
        assert exc.report is not None, str(exc)
        report = exc.report
    watcher.join(timeout=5)
    pool = {row["device"]: row for row in report["device_pool"]}
    assert report["measured_on"].startswith("pool of 2")
    first, second = (pool[label] for label in report["measured_on"].removeprefix("pool of 2 (")[:-1].split(", "))
    assert second["failed"] is not None and first["failed"] is None
    assert first["runs"] >= 3  # the baseline, the candidates, the final artifact: all measured on the first board
    assert report["validation"]["ok"]


def test_local_device_pool_label_and_status():
    pool = DevicePool([LocalDevice(), LocalDevice()])
    assert pool.label == "pool of 2 (local, local)"
    assert pool.status() == [{"device": "local", "runs": 0, "failed": None}] * 2
