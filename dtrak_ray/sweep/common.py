"""What the sweep's modules share: the splits and model it reads, and which projectors serve by prefix.

The sweep's modules are imported by every Tune trial: they must not load torch or diffusers at
import time (on a busy machine that costs a trial tens of seconds), so the stages are imported
inside the driver's functions and these constants mirror theirs (stages.common.TEST_SETS,
stages.featurize.MODEL; the tests check they agree).
"""

from __future__ import annotations

TEST_SETS = ("val", "gen")
MODEL = "base"
SPLITS = ("train", *TEST_SETS)

# Projectors whose first k' columns at dimension k equal the k'-projection (column tiles of fixed width).
PREFIX_PROJECTORS = ("gaussian", "rademacher")
