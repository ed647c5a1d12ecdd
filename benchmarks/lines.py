"""The benchmark scripts' table output: each line printed as it comes, and appended to a markdown
file at the end (`--out`), so a long grid's figures are on screen before the last point."""

from __future__ import annotations


class Lines:
    def __init__(self, out: str | None = None) -> None:
        self.out, self.lines = out, []

    def __call__(self, line: str = "") -> None:
        print(line, flush=True)
        self.lines.append(line)

    def save(self) -> None:
        """Append the lines to `out` (nothing without one)."""
        if self.out:
            with open(self.out, "a") as f:
                f.write("\n".join(self.lines) + "\n\n")
