"""The tables every benchmark prints."""

import statistics


def summary(values):
    """`(min, median, max)` of a sequence of numbers."""
    return min(values), statistics.median(values), max(values)


def format_table(header, rows, markdown):
    """`rows` under `header` as a GitHub markdown table, or as aligned text
    (first column left, the others right)."""
    rows = [[str(cell) for cell in row] for row in rows]
    if markdown:
        lines = ["| " + " | ".join(header) + " |"]
        aligns = ["---"] + ["---:"] * (len(header) - 1)
        lines.append("| " + " | ".join(aligns) + " |")
        lines += ["| " + " | ".join(row) + " |" for row in rows]
        return "\n".join(lines)
    widths = [max(len(str(x)) for x in column) for column in zip(header, *rows)]

    def line(row):
        cells = [str(row[0]).ljust(widths[0])]
        cells += [str(c).rjust(w) for c, w in zip(row[1:], widths[1:])]
        return "  ".join(cells).rstrip()

    out = [line(header), "  ".join("-" * w for w in widths)]
    out += [line(row) for row in rows]
    return "\n".join(out)
