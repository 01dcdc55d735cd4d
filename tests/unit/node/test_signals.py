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


def test_stop_signals_arrive_while_the_main_thread_is_inside_queue_get() -> None:
    # The daemon's own shape: the loop blocks on its event queue, a stop signal puts a Stop on it.
    # queue.Queue.get holds the queue's mutex while it removes a timed-out waiter; a signal landing
    # there ran a handler that put on the same queue and waited for that mutex forever. Held here
    # on purpose while both signals arrive (the window is too narrow to hit by timing alone).
    proc = run("""
        import os, queue, signal, sys, time
        from flanneld.node.signals import call_on_signals
        events = queue.Queue()
        call_on_signals(lambda sig: events.put(sig.name))
        with events.mutex:
            for sig in (signal.SIGINT, signal.SIGTERM):
                os.kill(os.getpid(), sig)
            time.sleep(0.3)
        got = {events.get(timeout=5), events.get(timeout=5)}
        print(" ".join(sorted(got)))
    """)
    assert (proc.returncode, proc.stdout) == (0, "SIGINT SIGTERM\n"), proc.stderr


def test_sigusr1_prints_every_threads_stack_and_the_process_goes_on() -> None:
    proc = run("""
        import os, signal, sys, threading, time
        from flanneld.node.signals import call_on_signals, format_stacks
        done = threading.Event()
        def dump(sig):
            print(format_stacks(), file=sys.stderr, flush=True)
            done.set()
        call_on_signals(dump, (signal.SIGUSR1,))
        threading.Thread(target=time.sleep, args=(2,), name="sleeper", daemon=True).start()
        os.kill(os.getpid(), signal.SIGUSR1)
        assert done.wait(5)
        print("still running", flush=True)
    """)
    assert proc.returncode == 0 and proc.stdout == "still running\n", proc.stderr
    assert proc.stderr.count("(most recent call first)") >= 3, proc.stderr  # main, signals, sleeper
    assert "(sleeper) (most recent call first):" in proc.stderr and " in <module>" in proc.stderr


def test_sigusr1_while_threads_start_and_end_never_kills_the_process() -> None:
    # faulthandler's all-thread dump read a thread's state as it was freed: SIGSEGV (daemon, CI)
    proc = run("""
        import os, signal, subprocess, sys, threading, time
        from flanneld.node.signals import call_on_signals, format_stacks
        dumps = []
        call_on_signals(lambda sig: dumps.append(format_stacks()), (signal.SIGUSR1,))
        stop = threading.Event()
        def churn():
            while not stop.is_set():
                threads = [threading.Thread(target=time.sleep, args=(0.001,)) for _ in range(20)]
                for t in threads:
                    t.start()
                for t in threads:
                    t.join()
        churners = [threading.Thread(target=churn) for _ in range(3)]
        for t in churners:
            t.start()
        # from another process, so the kernel picks any thread of ours, a dying one included
        subprocess.run(["sh", "-c", f"for i in $(seq 6000); do kill -USR1 {os.getpid()}; done"], check=True)
        stop.set()
        for t in churners:
            t.join()
        time.sleep(0.2)
        print("dumps", bool(dumps), flush=True)
    """, timeout=60)
    assert (proc.returncode, proc.stdout) == (0, "dumps True\n"), proc.stderr[-2000:]


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


def test_a_stop_that_hangs_dumps_every_stack_and_exits_after_the_grace() -> None:
    """Seen once in CI: a daemon received SIGTERM and then neither stopped nor ran SIGUSR1's dump
    (something held the interpreter lock). The grace timer runs on faulthandler's own C thread."""
    proc = run("""
        import os, signal, time
        from flanneld.node import daemon
        from flanneld.node.signals import call_on_signals
        daemon.STOP_GRACE = 1.0
        node = daemon.Daemon(daemon.DaemonOptions())
        call_on_signals(node._on_signal)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(8)  # the stop never completes
    """)
    assert proc.returncode == 1
    assert "Thread 0x" in proc.stderr and "in <module>" in proc.stderr, proc.stderr
