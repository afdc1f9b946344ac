"""One row of this comparison (digits, seed 0, MIST's k fixed) at a given edge learning rate.

Why the MLP / depthwise-conv block ablations collapse on digits at shallow k: run each with the
LAE's learning rate (2e-3, the committed rows) and with the linear heads' (3e-2), beside
gather + linear at both. The run's own device cache is reused, so nothing is embedded again:

    MIST_FED_CACHE=<the run's cache> python docs/results/paper-compare/lr_check.py 0.002 mist_mlp
    ... 0.03 mist_mlp, 0.03 mist_dwconv, 0.002 gather_linear, 0.03 gather_linear

(run on a2d1a48's tree, the comparison's own; output in lr_check.log).
"""

import os
import sys

from mist_fed.commands.compare import main
from mist_fed.device import trainer

lr, method = float(sys.argv[1]), sys.argv[2]
k = sys.argv[3] if len(sys.argv) > 3 else "4"
trainer.METHOD_LR[method] = lr
cache = os.environ["MIST_FED_CACHE"]
argv = ["--tasks", "digits", "--methods", method, "--mist-k", k, "--wire", "--seeds", "1"]
argv += ["--epochs", "15", "--test-limit", "1000", "--run-id", f"lrcheck-{method}-{lr}"]
argv += ["--out", os.path.join(cache, "lrcheck"), "--device-dir"]
argv += [os.path.join(cache, "compare", "paper-compare")]
sys.exit(main(argv))
