"""The leak check (leak_fixtures.py) fails the test that leaked, by name, and no later test."""

from __future__ import annotations

from pathlib import Path

import leak_fixtures
import pytest

pytest_plugins = ["pytester"]

CONFTEST = """
import pytest
from leak_fixtures import Snapshot, check_no_leaks

@pytest.fixture(autouse=True)
def no_leaks(request):
    before = Snapshot.take()
    yield
    check_no_leaks(request, before)
"""

TESTS = """
import socket, subprocess, sys, threading
import pytest

RELEASE = threading.Event()
KEPT = []

def test_a_leaks_a_thread():
    threading.Thread(target=RELEASE.wait, name="left-by-a", daemon=True).start()

def test_b_leaks_a_process():
    KEPT.append(subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]))

def test_c_leaks_a_listener():
    KEPT.append(socket.create_server(("127.0.0.1", 0)))

def test_d_is_clean():
    pass

@pytest.mark.leaves(threads=("left-by-e",), reason="checked below")
def test_e_says_what_it_leaves():
    threading.Thread(target=RELEASE.wait, name="left-by-e", daemon=True).start()

def test_z_cleans_up():
    RELEASE.set()
    for kept in KEPT:
        if isinstance(kept, subprocess.Popen):
            kept.kill()
            kept.wait()
        else:
            kept.close()
"""


def test_each_leak_fails_its_own_test_by_name(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(leak_fixtures, "WIND_DOWN_S", 0.2)  # the same module runs inside
    pytester.makeini("[pytest]\nasyncio_default_fixture_loop_scope = function\n")
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(test_leaky=TESTS)
    pytester.syspathinsert(Path(__file__).parent)
    result = pytester.runpytest("-p", "no:cacheprovider", "-p", "no:randomly")
    result.assert_outcomes(passed=6, errors=3)
    result.stdout.fnmatch_lines(
        [
            "*test_a_leaks_a_thread left running after its teardown*thread 'left-by-a'*",
            "*test_b_leaks_a_process left running*process *time.sleep(60)*",
            "*test_c_leaks_a_listener left running*1 socket(s)*127.0.0.1:* -> *LISTEN*",
        ]
    )
    errors = [line for line in result.outlines if line.startswith("ERROR ")]
    assert [line.split("::")[1].split()[0] for line in errors] == [
        "test_a_leaks_a_thread",
        "test_b_leaks_a_process",
        "test_c_leaks_a_listener",
    ]


PER_MODULE_CONFTEST = """
import pytest
from leak_fixtures import Snapshot, check_no_leaks

@pytest.fixture(scope="module", autouse=True)
def no_leaks_per_module(request):
    before = Snapshot.take()
    yield
    check_no_leaks(request, before)
"""

SHARED = """
import threading
import pytest

STOP = threading.Event()

@pytest.fixture(scope="module")
def shared():
    workers = []

    def use():
        workers.append(threading.Thread(target=STOP.wait, name="shared-worker"))
        workers[-1].start()

    yield use
    STOP.set()
    for worker in workers:
        worker.join()

def test_first_use_starts_the_worker(shared):
    shared()

def test_a_second_test(shared):
    pass
"""

LEAKY = """
import threading
import time

def test_leaves_a_thread():
    # Ends by itself in 0.6 s: after the check inside, before the one around this run.
    threading.Thread(target=time.sleep, args=(0.6,), name="left-by-module", daemon=True).start()

def test_last():
    pass
"""


def test_a_module_checked_as_a_whole_fails_its_last_test_naming_the_module(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(leak_fixtures, "WIND_DOWN_S", 0.2)
    pytester.makeini("[pytest]\nasyncio_default_fixture_loop_scope = function\n")
    pytester.makeconftest(PER_MODULE_CONFTEST)
    pytester.makepyfile(test_shared=SHARED, test_zleaky=LEAKY)
    pytester.syspathinsert(Path(__file__).parent)
    result = pytester.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(passed=4, errors=1)
    result.stdout.fnmatch_lines(
        [
            "*ERROR at teardown of test_last*",
            "*test_zleaky.py left running after its teardown*thread 'left-by-module'*",
        ]
    )
