"""Data sharded over devices and over processes: the same numbers as on one device.

The checks on 8 devices live in `sharded_on_8_devices.py` and run here in a
subprocess with `XLA_FLAGS=--xla_force_host_platform_device_count=8`, so this
session keeps its one device. The multi-process test starts real JAX processes
on this machine (CPU collectives over 127.0.0.1) and compares what they compute
together with this process's single-device result.
"""

import os
import pathlib
import socket
import subprocess
import sys

import numpy as np
from _reference import assert_close
from _scaling import expected

TESTS = pathlib.Path(__file__).parent
TIMEOUT = 300


def run(command, env=None):
    """Run a command to completion, or kill it after TIMEOUT seconds."""
    return subprocess.run(
        command,
        cwd=TESTS,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )


def test_sharded_over_8_devices():
    result = run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "sharded_on_8_devices.py",
        ],
        env={"XLA_FLAGS": "--xla_force_host_platform_device_count=8"},
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert " passed" in result.stdout and "skipped" not in result.stdout


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_processes_equal_one(tmp_path):
    num_processes = 2
    out_file = tmp_path / "result.npz"
    port = str(free_port())
    workers = [
        subprocess.Popen(
            [
                sys.executable,
                "_multiprocess_worker.py",
                str(i),
                str(num_processes),
                port,
                str(out_file),
            ],
            cwd=TESTS,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(num_processes)
    ]
    logs = []
    try:
        for worker in workers:
            logs.append(worker.communicate(timeout=TIMEOUT)[0])
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.kill()
                worker.wait()
    assert all(worker.returncode == 0 for worker in workers), "\n".join(logs)
    result = np.load(out_file)
    for name in ("mv", "cg"):
        assert_close(result[name], expected("mc")[name], err_msg=name)
