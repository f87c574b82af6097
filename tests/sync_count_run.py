"""Runs tltrain.engine.synthetic with every call that makes the host wait counted per training step: the Tensor
methods that read a value back (item, tolist, __int__, __float__, __bool__, numpy, cpu) and the collectives of
torch.distributed, counted when tltrain's own code calls them (torch's internals are not tltrain's syncs). Writes
<out>.<rank>.json: per optimizer step the counts inside Trainer.train_step and inside the feed's fetches, and the
counts of each Trainer.check. Usage: python sync_count_run.py OUT SYNTHETIC-ARGS..."""
import json
import os
import sys
from collections import Counter
from pathlib import Path

import torch
import torch.distributed as dist

import tltrain
from tltrain.engine import feed, synthetic, trainer

PACKAGE = str(Path(tltrain.__file__).parent)
counts: Counter = Counter()
phase = ["other"]


def counted(name, original):
    def wrapper(*args, **kwargs):
        caller = sys._getframe(1).f_code.co_filename
        if caller.startswith(PACKAGE):
            counts[(phase[-1], name)] += 1
        return original(*args, **kwargs)
    return wrapper


for name in ("item", "tolist", "__int__", "__float__", "__bool__", "numpy", "cpu"):
    setattr(torch.Tensor, name, counted(name, getattr(torch.Tensor, name)))
for name in ("all_reduce", "all_gather", "all_gather_object", "broadcast", "broadcast_object_list", "barrier"):
    setattr(dist, name, counted(name, getattr(dist, name)))

steps, checks = [], []


def in_phase(name, function, record=None):
    def wrapper(*args, **kwargs):
        before = Counter({k: v for k, v in counts.items() if k[0] == name})
        phase.append(name)
        try:
            return function(*args, **kwargs)
        finally:
            phase.pop()
            if record is not None:
                after = Counter({k[1]: v for k, v in counts.items() if k[0] == name})
                record.append(dict(after - Counter({k[1]: v for k, v in before.items()})))
    return wrapper


step_calls: list = []
fetch_calls: list = []
trainer.Trainer.train_step = in_phase("step", trainer.Trainer.train_step, step_calls)
trainer.Trainer.check = in_phase("check", trainer.Trainer.check, checks)
feed.StepFeed._fetch = in_phase("fetch", feed.StepFeed._fetch, fetch_calls)

code = synthetic.main(sys.argv[2:])
rank = int(os.environ.get("RANK", 0))
Path(f"{sys.argv[1]}.{rank}.json").write_text(json.dumps({"steps": step_calls, "fetches": fetch_calls,
                                                           "checks": checks}))
sys.exit(code)
