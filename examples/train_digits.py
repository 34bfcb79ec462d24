"""The main job: scikit-learn's digits trained three ways (plain Adam,
accumulation_steps=8, accumulation + noise + clipping), with gradient
statistics, TensorBoard logs, PNGs and a comparison table.

The code lives in `keras_gradtools/demo.py` so that the installed
`keras-gradtools demo` command runs the same thing.

    python examples/train_digits.py [--quick] [--epochs N] [--output-dir D]
"""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from keras_gradtools.demo import RUNS  # noqa: E402, F401
from keras_gradtools.demo import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
