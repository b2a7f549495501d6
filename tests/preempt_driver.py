"""``python tests/preempt_driver.py <minillm-train arguments>``: minillm-train through its console entry point
(run_console) in one intra-op thread (the results equal an in-process run's bitwise), for the kill -9 and
signal tests of tests/test_preemption_processes.py.

``SLOW_SAVE=<seconds>``: each checkpoint pauses that long after its weights and optimizer state are written and
before its trainer state, so a test can kill the process in the middle of a checkpoint (while
``checkpoints/.tmp-step-N`` exists) instead of hoping to hit a window of milliseconds.
"""

import os
import sys
import time

import torch

torch.set_num_threads(1)
delay = float(os.environ.get("SLOW_SAVE", "0"))
if delay:
    from minillm import strategy

    for cls in (strategy.LocalStrategy, strategy.DeepSpeedStrategy):
        def slow(self, directory, tokenizer, _save=cls.save_checkpoint):
            _save(self, directory, tokenizer)
            time.sleep(delay)

        cls.save_checkpoint = slow

from minillm.cli import run_console  # noqa: E402
from minillm.cli.train import main  # noqa: E402

sys.argv[0] = "minillm-train"
run_console(main)
