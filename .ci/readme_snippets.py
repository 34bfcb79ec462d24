"""Runs the README's marked Python blocks, each in a fresh process.

A block runs when the line before its opening fence is the marker comment

    <!-- ci: run -->

(blank lines between them are allowed). Each marked block is written to
its own file in a temporary directory and run there by the given Python
interpreter, with a timeout. Exits 0 when every block succeeds, 1 when one
fails (its output is printed), and 2 when none is marked, unless
`--allow-none` is passed: a README that loses its markers must not pass CI
by running nothing.

    python .ci/readme_snippets.py README.md --python .venv/bin/python
"""

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time

MARKER = "<!-- ci: run -->"
FENCE = re.compile(r"^(\s*)(```+|~~~+)\s*(\w*)\s*$")


def marked_blocks(text: str) -> list[tuple[int, str]]:
    """The marked Python blocks of a markdown text.

    Args:
        text: The markdown.

    Returns:
        A list of `(line number of the opening fence, code)` pairs, 1-based.
    """
    lines = text.splitlines()
    blocks = []
    i = 0
    while i < len(lines):
        match = FENCE.match(lines[i])
        if not match:
            i += 1
            continue
        fence, language = match.group(2), match.group(3)
        end = i + 1
        while end < len(lines) and not lines[end].strip().startswith(fence):
            end += 1
        previous = i - 1
        while previous >= 0 and not lines[previous].strip():
            previous -= 1
        marked = previous >= 0 and lines[previous].strip() == MARKER
        if marked and language in ("python", "py"):
            blocks.append((i + 1, "\n".join(lines[i + 1 : end]) + "\n"))
        i = end + 1
    return blocks


def main(argv: list[str] | None = None) -> int:
    """Runs the marked blocks. Returns the exit code."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("markdown", help="the markdown file (README.md)")
    parser.add_argument(
        "--python",
        default=sys.executable,
        help="the interpreter to run the blocks with (default: this one)",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=600,
        help="seconds per block (default 600)",
    )
    parser.add_argument(
        "--allow-none",
        action="store_true",
        help="exit 0 when no block is marked (default: exit 2)",
    )
    args = parser.parse_args(argv)
    with open(args.markdown, encoding="utf-8") as handle:
        blocks = marked_blocks(handle.read())
    if not blocks:
        print(
            f"readme_snippets: no Python block of {args.markdown} is marked "
            f"with {MARKER!r} on the line before its fence"
            + (" (allowed: --allow-none)" if args.allow_none else ""),
            file=sys.stderr,
        )
        return 0 if args.allow_none else 2
    failed = 0
    with tempfile.TemporaryDirectory() as directory:
        for number, (line, code) in enumerate(blocks, 1):
            path = os.path.join(directory, f"snippet_{number}_line{line}.py")
            with open(path, "w", encoding="utf-8") as handle:
                handle.write(code)
            start = time.perf_counter()
            try:
                done = subprocess.run(
                    [args.python, path],
                    cwd=directory,
                    capture_output=True,
                    text=True,
                    timeout=args.timeout,
                )
                code_, output = done.returncode, done.stdout + done.stderr
            except subprocess.TimeoutExpired as error:
                code_ = "timeout"
                output = f"{error.stdout or ''}{error.stderr or ''}"
            seconds = time.perf_counter() - start
            where = f"{args.markdown}:{line}"
            if code_ == 0:
                print(f"readme_snippets: ok   {where} ({seconds:.0f} s)")
            else:
                failed += 1
                print(
                    f"readme_snippets: FAIL {where} ({code_}, {seconds:.0f} "
                    f"s); its output:\n{output[-5000:]}"
                )
    print(f"readme_snippets: {len(blocks) - failed}/{len(blocks)} passed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
