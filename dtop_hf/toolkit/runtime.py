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
"""Run a job's processes from start to a clean end: the distributed state is always ended before the interpreter.

Why: Gloo runs each collective on a worker thread of the process group (`ProcessGroupGloo::runLoop`), which keeps
the finished work, and with it the collective's tensors, until it picks up the next one. Dropping a tensor that
has a Python object takes the GIL (`TensorImpl::decref_pyobject`). A process that returns right after its last
collective (as the non-main processes of `accelerate launch` do after a gather) can be in `Py_FinalizeEx` by then;
CPython 3.11 answers a thread asking for the GIL during finalization with `pthread_exit`, whose forced unwind
reaches the work's `noexcept` destructor: `std::terminate`, "terminate called without an active exception",
SIGABRT, and the launcher fails the whole job although every result was written. Ending the group while the
interpreter still runs (a barrier, then `destroy_process_group`, which joins the worker threads without holding the
GIL) lets those threads finish first. Use one of the sessions below around a script's work:

    with accelerator_session(**runtime_args.accelerator_kwargs()) as accelerator:
        ...  # the job's steps
    # every process has finished (and waited for the others), trackers are closed, the process group is gone

`partial_state_session` does the same for scripts that need only a `PartialState` (no training objects). Writers
that the job starts itself (thread pools, files) belong inside the `with` block, in their own `with`, so that they
finish before the processes meet for the last time.
"""

import contextlib
import logging
import sys
from collections.abc import Iterator

import torch.distributed
from accelerate import Accelerator, PartialState


logger = logging.getLogger(__name__)


def end_distributed_state(state: PartialState, succeeded: bool) -> None:
    """End a process's part of the job: meet the other processes (after success), end the process group.

    After success every process waits for the others, so that none tears its connections down while another still
    gathers or writes. After an error there is no meeting: the other processes may never arrive (they may be the
    ones that failed, or be waiting in a collective this process left), and the launcher stops them anyway.

    Args:
        state: the job's `PartialState` (an `Accelerator`'s is `accelerator.state`).
        succeeded: whether the job's work ended without an exception.
    """
    for stream in (sys.stdout, sys.stderr):  # what the processes printed comes out before the launcher's summary
        stream.flush()
    if not torch.distributed.is_available() or not torch.distributed.is_initialized():
        return
    if succeeded:
        state.wait_for_everyone()
    # The state keeps its process index and count (a script may still read `is_main_process` after the block);
    # only collectives end with the group.
    state.destroy_process_group()


def configure_logging(state: PartialState) -> None:
    """Log lines with time and source at INFO; libraries' warnings on each machine's main process only, their
    errors everywhere; then one line naming this process (a run with the wrong world size shows at once)."""
    import datasets
    import transformers

    logging.basicConfig(
        format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", datefmt="%H:%M:%S", level=logging.INFO
    )
    for library in (datasets, transformers):
        if state.is_local_main_process:
            library.utils.logging.set_verbosity_warning()
        else:
            library.utils.logging.set_verbosity_error()
    logger.info(
        f"process {state.process_index} of world size {state.num_processes} ({state.distributed_type}, device "
        f"{state.device})"
    )


@contextlib.contextmanager
def accelerator_session(**accelerator_kwargs) -> Iterator[Accelerator]:
    """An `Accelerator(**accelerator_kwargs)` for the `with` block; on leaving it, trackers are finished and the
    distributed state ended, whether the block succeeded or raised (see [`end_distributed_state`])."""
    accelerator = Accelerator(**accelerator_kwargs)
    succeeded = False
    try:
        yield accelerator
        succeeded = True
    finally:
        try:
            for tracker in accelerator.trackers:  # what `Accelerator.end_training` does before its group teardown
                tracker.finish()
        finally:
            end_distributed_state(accelerator.state, succeeded)


@contextlib.contextmanager
def partial_state_session(**state_kwargs) -> Iterator[PartialState]:
    """A `PartialState(**state_kwargs)` for the `with` block, ended like [`accelerator_session`]'s."""
    state = PartialState(**state_kwargs)
    succeeded = False
    try:
        yield state
        succeeded = True
    finally:
        end_distributed_state(state, succeeded)


__all__ = ["accelerator_session", "configure_logging", "end_distributed_state", "partial_state_session"]
