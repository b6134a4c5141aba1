# Copyright 2026 The dtop-hf Authors.
#
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#
#     http://www.apache.org/licenses/LICENSE-2.0
#
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS,
# WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
# See the License for the specific language governing permissions and
# limitations under the License.
"""The toolkit's sessions end the distributed state, after success and after an error, in one process and in two."""

import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch.distributed

from dtop_hf.toolkit.runtime import accelerator_session, partial_state_session


REPO_ROOT = Path(__file__).resolve().parents[1]
# Two processes gather, then (inside or outside the session) list the process group's threads still alive: the
# session must have ended the group and joined Gloo's worker threads, with the interpreter still running.
TWO_PROCESS_JOB = textwrap.dedent(
    """
    import os, sys
    import torch.distributed
    from accelerate.utils import gather_object
    from dtop_hf.toolkit.runtime import {session}

    fail = sys.argv[1] == "fail"
    with {session}(cpu=True) as state:
        gathered = gather_object([state.process_index])
        if fail and state.process_index == 1:
            raise RuntimeError("rank 1 failed")
    threads = [open(f"/proc/self/task/{{tid}}/comm").read().strip() for tid in os.listdir("/proc/self/task")]
    print(f"rank {{state.process_index}}: gathered {{gathered}}, group alive {{torch.distributed.is_initialized()}}, "
          f"gloo threads {{sum(name.startswith(('pt_gloo', 'gloo')) for name in threads)}}", flush=True)
    """
)


def launch_two_processes(tmp_path: Path, session: str, outcome: str) -> subprocess.CompletedProcess:
    script = tmp_path / "job.py"
    script.write_text(TWO_PROCESS_JOB.format(session=session))
    with socket.socket() as probe:  # a free port: other test runs may hold accelerate's default 29500
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines",
        "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port), str(script),
        outcome,
    ]  # fmt: skip
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO_ROOT, timeout=240)


@pytest.mark.parametrize("session", ["accelerator_session", "partial_state_session"])
def test_two_processes_end_their_group_before_exit(tmp_path, session):
    completed = launch_two_processes(tmp_path, session, "succeed")
    output = completed.stdout + completed.stderr
    assert completed.returncode == 0, output[-4000:]
    for rank in (0, 1):
        assert f"rank {rank}: gathered [0, 1], group alive False, gloo threads 0" in output


def test_an_error_in_one_process_fails_the_job_without_a_hang(tmp_path):
    """No final barrier after an error: the failing process leaves at once, the launcher stops the other."""
    completed = launch_two_processes(tmp_path, "partial_state_session", "fail")
    output = completed.stdout + completed.stderr
    assert completed.returncode != 0 and "RuntimeError: rank 1 failed" in output
    assert "terminate called" not in output


@pytest.mark.parametrize("session", [accelerator_session, partial_state_session])
def test_one_process_session_passes_errors_through(session):
    with pytest.raises(KeyError, match="raised inside"):
        with session(cpu=True) as state:
            assert state.num_processes == 1
            raise KeyError("raised inside")
    assert not torch.distributed.is_initialized()
