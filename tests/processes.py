"""Helpers for tests that start processes: free ports on 127.0.0.1,
bounded waits that never leave a process behind, and the `RESULT {json}`
lines the scripts in tests/scripts print."""

import json
import socket


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def parse_results(stdout):
    """The JSON objects of a script's `RESULT ` lines."""
    return [
        json.loads(line[len("RESULT ") :])
        for line in stdout.splitlines()
        if line.startswith("RESULT ")
    ]


def finish(processes, timeout):
    """`(stdout, stderr)` of each process, waiting at most `timeout` seconds
    for each; any still running afterwards (or on an error) is killed."""
    outputs = []
    try:
        for process in processes:
            outputs.append(process.communicate(timeout=timeout))
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.communicate()
    return outputs
