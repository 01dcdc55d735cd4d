"""Stop signals reach the daemon even when they land while the main thread holds a lock."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest


def run(script: str, timeout: float = 10) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run([sys.executable, "-c", textwrap.dedent(script)], capture_output=True,
                              text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail("the process hung: the signal's callback waited on a lock its own thread held")


def test_a_signal_arriving_while_the_main_thread_holds_the_callbacks_lock_is_still_handled() -> None:
    # A handler run by the main thread itself (signal.signal with the callback) would wait on
    # `lock` here forever: that is how a daemon came to ignore SIGTERM inside queue.Queue.get.
    proc = run("""
        import os, signal, sys, threading, time
        from flanneld.node.signals import call_on_signals
        lock = threading.Lock()
        handled = threading.Event()
        def on_stop(sig):
            with lock:
                print("got", sig.name, flush=True)
                handled.set()
        call_on_signals(on_stop)
        with lock:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.3)
            assert not handled.is_set()  # the callback waits for the lock: it runs elsewhere
        sys.exit(0 if handled.wait(5) else 3)
    """)
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, "got SIGTERM\n", "")


def test_stop_signals_arrive_while_the_main_thread_waits_on_a_queue() -> None:
    # the daemon's own shape: the loop blocks on its event queue, the signal thread puts a Stop
    proc = run("""
        import os, queue, signal, sys, threading
        from flanneld.node.signals import call_on_signals
        events = queue.Queue()
        call_on_signals(lambda sig: events.put(sig.name))
        def send():
            for sig in (signal.SIGINT, signal.SIGTERM):
                os.kill(os.getpid(), sig)
        threading.Timer(0.2, send).start()
        got = set()
        while len(got) < 2:
            try:
                got.add(events.get(timeout=0.0005))
            except queue.Empty:
                pass
        print(" ".join(sorted(got)))
    """)
    assert (proc.returncode, proc.stdout) == (0, "SIGINT SIGTERM\n")


def test_sigusr1_prints_every_threads_stack_and_the_process_goes_on() -> None:
    proc = run("""
        import os, signal, threading, time
        from flanneld.node.signals import dump_stacks_on
        dump_stacks_on(signal.SIGUSR1)
        threading.Thread(target=time.sleep, args=(2,), name="sleeper", daemon=True).start()
        os.kill(os.getpid(), signal.SIGUSR1)
        time.sleep(0.1)
        print("still running", flush=True)
    """)
    assert proc.returncode == 0 and proc.stdout == "still running\n"
    assert proc.stderr.count("(most recent call first)") >= 2, proc.stderr  # main + the sleeper


def test_a_failing_callback_does_not_deafen_the_process_to_the_next_signal() -> None:
    proc = run("""
        import os, signal, sys, threading
        from flanneld.node.signals import call_on_signals
        calls = []
        done = threading.Event()
        def on_stop(sig):
            calls.append(sig.name)
            if len(calls) == 1:
                raise RuntimeError("boom")
            done.set()
        call_on_signals(on_stop)
        os.kill(os.getpid(), signal.SIGTERM)
        threading.Event().wait(0.3)
        os.kill(os.getpid(), signal.SIGINT)
        sys.exit(0 if done.wait(5) else 3)
    """)
    assert proc.returncode == 0 and "handling SIGTERM failed" in proc.stderr and "boom" in proc.stderr
