"""The ``grpc-balance`` command line, run as a user runs it: a subprocess."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from grpc_balance_mw.cli import main

COMMAND = [sys.executable, "-m", "grpc_balance_mw.cli"]


def run(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*COMMAND, *args], capture_output=True, text=True, timeout=timeout, check=False
    )


@pytest.mark.parametrize(
    "args",
    [
        [],
        ["nonsense"],
        ["demo", "--rate", "0"],
        ["demo", "--rate", "-3"],
        ["demo", "--rate", "nan"],
        ["demo", "--rate", "inf"],
        ["demo", "--rate", "fast"],
        ["demo", "--calls", "-5"],
        ["demo", "--calls", "0"],
        ["demo", "--calls", "2.5"],
        ["demo", "--calls", "10000000"],
        ["demo", "--service", "istio"],
        ["demo", "--l4", "ipvs"],
        ["demo", "--surge", "0"],
        ["demo", "--surge", "501"],
        ["bench", "--scenario", "chaos"],
        ["bench", "--calls", "0"],
        ["bench", "--calls", "-5"],
        ["bench", "--rounds", "0"],
        ["bench", "--rate", "-1"],
        ["bench", "--rate", "nan"],
        ["bench", "--l4", "ipvs"],
        ["bench", "--strategy", "magic"],
        ["bench", "--surge", "0"],
        ["bench", "--scale-wait-s", "0.5"],
        ["bench", "--scale-wait-s", "1000"],
        ["demo", "--unknown"],
        ["demo", "extra"],
        ["overhead", "--rounds", "0"],
        ["overhead", "--rounds", "1000"],
        ["overhead", "--calls", "-1"],
        ["overhead", "--warmup", "-1"],
    ],
    ids=lambda args: " ".join(args) or "nothing",
)
def test_a_bad_argument_is_one_usage_line_and_exit_2(
    args: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        main(args)
    assert exited.value.code == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert len(err.splitlines()) == 1 and ": error: " in err and "--help" in err, err


@pytest.mark.slow
def test_help_lists_the_subcommands_from_the_console_script_module() -> None:
    done = run("--help")
    assert done.returncode == 0, done.stderr
    assert all(name in done.stdout for name in ("demo", "bench", "doctor", "overhead"))
    version = run("--version")
    assert version.returncode == 0 and version.stdout.startswith("grpc-balance 0.")


def test_a_configuration_error_is_one_line_and_exit_1(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from grpc_balance_mw.cli import demo

    reason = "haproxy is not installed (Debian package: haproxy)"
    monkeypatch.setattr(demo, "missing_components", lambda **kwargs: [reason])
    assert main(["demo", "--service", "haproxy"]) == 1
    assert capsys.readouterr().err.splitlines() == [f"grpc-balance: error: {reason}"]


@pytest.mark.slow
def test_a_missing_extra_is_one_line_naming_it() -> None:
    # As on a plain install: the OpenTelemetry SDK cannot be imported.
    code = (
        "import sys; sys.modules['opentelemetry.sdk'] = None; "
        "from grpc_balance_mw.cli import main; sys.exit(main(['overhead']))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 1
    assert done.stderr.splitlines() == [
        "grpc-balance overhead needs opentelemetry-sdk: pip install 'grpc_balance_mw[bench]'"
    ]


@pytest.mark.slow
def test_overhead_prints_results_on_stdout_and_progress_on_stderr() -> None:
    # A hang guard, not a time limit: the run takes 25-40 s on 2 shared cores, more under load.
    done = run("overhead", "--rounds", "2", "--calls", "20", "--warmup", "5", timeout=240)
    assert done.returncode == 0, done.stderr
    assert "round 2/2" in done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("warm unary calls to 127.0.0.1:")
    assert any(line.startswith("bare ") for line in lines)
    assert any(line.startswith("detection vs bare: ") for line in lines)
    assert "round 1/2" not in done.stdout


@pytest.mark.slow
def test_ctrl_c_stops_cleanly_with_130() -> None:
    process = subprocess.Popen(
        [*COMMAND, "overhead", "--rounds", "100", "--calls", "10000"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stderr is not None
        deadline = time.monotonic() + 240  # a hang guard: warming up is slow on a busy machine
        while "round 1/" not in process.stderr.readline():  # measuring has begun
            assert time.monotonic() < deadline and process.poll() is None
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=120)  # a hang guard too
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 130
    assert "Traceback" not in err
    assert err.strip().endswith("grpc-balance: interrupted")
    assert out == ""


@pytest.mark.slow
def test_ctrl_c_among_many_callers_ends_the_calls_in_flight_and_leaves_no_process() -> None:
    """Ctrl-C from a terminal reaches the whole process group, the pod process too, while 32
    threads have calls in flight to it: the pod ends them as it stops (it used to leave them to
    their 10 s deadline, and could print a traceback from its server's threads), and nothing
    stays."""
    mark = f"GRPC_BALANCE_CLI_TEST={os.getpid()}-{time.monotonic_ns()}"
    key, value = mark.split("=")
    process = subprocess.Popen(
        [*COMMAND, "overhead", "--rounds", "100", "--calls", "5", "--warmup", "1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # a process group of its own, as a terminal's job is
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        env={**os.environ, key: value},
    )
    try:
        assert process.stderr is not None
        deadline = time.monotonic() + 120
        while "32 threads, round 2/" not in process.stderr.readline():
            assert time.monotonic() < deadline and process.poll() is None
        time.sleep(0.2)  # calls in flight
        os.killpg(process.pid, signal.SIGINT)
        interrupted = time.monotonic()
        _, err = process.communicate(timeout=60)
        # Liveness, not speed: stopping takes well under a second; waiting out the calls'
        # deadline takes 10 s.
        assert time.monotonic() - interrupted < 8, "the calls in flight waited for their deadline"
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    assert_interrupted_leaving_nothing(process.returncode, err, mark)


def assert_interrupted_leaving_nothing(returncode: int | None, err: str, mark: str) -> None:
    """The command stopped as Ctrl-C should stop it, and no process it started lives on."""
    assert returncode == 130, err
    assert "Traceback" not in err
    assert err.strip().endswith("grpc-balance: interrupted")
    deadline = time.monotonic() + 10  # its pods may take a moment to go
    while processes_marked(mark) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert processes_marked(mark) == []


def processes_marked(mark: str) -> list[int]:
    """Live processes whose environment carries ``mark`` (children inherit it)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as environ:
                if mark.encode() in environ.read():
                    found.append(int(entry))
        except OSError:
            continue  # gone, or not ours to read
    return found


@pytest.mark.cluster
def test_ctrl_c_in_the_demo_stops_the_local_cluster() -> None:
    mark = f"GRPC_BALANCE_CLI_TEST={os.getpid()}-{time.monotonic_ns()}"
    key, value = mark.split("=")
    process = subprocess.Popen(
        [*COMMAND, "demo", "--calls", "100000", "--rate", "100"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, key: value},
    )
    try:
        assert process.stderr is not None
        deadline = time.monotonic() + 60
        while "act 1/" not in process.stderr.readline():  # the cluster is up
            assert time.monotonic() < deadline and process.poll() is None
        assert len(processes_marked(mark)) > 3  # the command and its pods
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert_interrupted_leaving_nothing(process.returncode, err, mark)


def test_bench_says_what_its_service_lacks_in_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from grpc_balance_mw.cli import bench_command

    reason = "haproxy is not installed (Debian package: haproxy)"
    monkeypatch.setattr(bench_command, "missing_components", lambda **kwargs: [reason])
    assert main(["bench", "--l4", "haproxy"]) == 1
    out, err = capsys.readouterr()
    assert out == "" and err.splitlines() == [f"grpc-balance: error: {reason}"]
