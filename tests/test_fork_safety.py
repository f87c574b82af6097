"""A process that ran the DALI backend and then forks (torch DataLoader workers, prepare's pool) must not hang.

A forked child inherits the parent's DALI pipelines. If the child's garbage collector frees one, DALI's
Pipeline.__del__ waits for pipeline threads that exist only in the parent: the child hangs for ever. This hung the
full test suite at test_loaders (torch backend after DALI tests in the same process) and would hang any user
process that evaluates with DALI and then with torch. tltrain.data.loaders.dali registers an at-fork hook that
makes children disown inherited pipelines.
"""
import gc
import os
import signal
import time


from tltrain.data.loaders import LoaderConfig, build_loader


def _wait_for(pid: int, seconds: float) -> int | None:
    """The child's exit status, or None if it is still running after `seconds` (then it is killed)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return status
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    return None


def test_forked_child_collects_an_inherited_dali_pipeline_without_hanging(fundus_shards):
    cfg = LoaderConfig(backend="dali", batch_size=4, size=32, workers=1)
    loader = build_loader(cfg, fundus_shards, "val", train=False)
    next(iter(loader))  # the pipeline is built and its threads run
    cycle = {"loader": loader}
    cycle["self"] = cycle  # only the cyclic collector can free it: in the child, not by reference counting here
    del loader
    gc.disable()  # the parent must not collect it first
    try:
        pid = os.fork()
        if pid == 0:  # the child: collect everything it inherited, then leave without running any teardown
            gc.enable()
            del cycle
            gc.collect()
            os._exit(0)
        status = _wait_for(pid, 30)
    finally:
        gc.enable()
    assert status is not None, "the forked child hung freeing the DALI pipeline it inherited from its parent"
    assert os.waitstatus_to_exitcode(status) == 0


def test_torch_loader_after_dali_in_one_process(fundus_shards):
    """What the hung suite did: DALI batches, then the torch backend with worker processes, same process."""
    dali = build_loader(LoaderConfig(backend="dali", batch_size=4, size=32, workers=1), fundus_shards, "val",
                        train=False)
    dali_keys = [k for batch in dali for k, v in zip(batch.keys, batch.valid) if v]
    cycle = {"loader": dali}
    cycle["self"] = cycle
    del dali
    torch_loader = build_loader(LoaderConfig(backend="torch", batch_size=4, size=32, workers=2), fundus_shards, "val",
                                train=False)
    torch_keys = [k for batch in torch_loader for k, v in zip(batch.keys, batch.valid) if v]
    assert sorted(torch_keys) == sorted(dali_keys) and torch_keys
