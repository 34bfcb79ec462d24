"""The `keras-gradtools` command: `keras-gradtools demo [options]`."""

import os
import sys


def main(argv=None):
    """Runs a subcommand. Returns the process exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(
            "usage: keras-gradtools demo [--quick] [--epochs N] "
            "[--output-dir DIR] [...]\n\n"
            "  demo   train scikit-learn's digits three ways (plain, "
            "accumulation, accumulation + noise) and compare them;\n"
            "         `keras-gradtools demo --help` lists its options."
        )
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command != "demo":
        print(f"keras-gradtools: unknown command {command!r} (try 'demo')")
        return 2
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    from keras_gradtools import demo

    return demo.main(rest)


if __name__ == "__main__":
    sys.exit(main())
