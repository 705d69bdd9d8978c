"""What the benchmark scripts share (not a benchmark): a failed mtgpt command is said with its own
error. They run mtgpt with subprocess.run(check=True, capture_output=True), which on a failure
showed only "returned non-zero exit status 1" in a traceback."""

from __future__ import annotations

import shlex
import subprocess
import sys
from typing import Callable


def run_main(main: Callable[[], None]) -> None:
    """main(); a failed child command ends it with the command and the end of its stderr, exit 1."""
    try:
        main()
    except subprocess.CalledProcessError as e:
        err = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else (e.stderr or "")
        sys.exit(f"{shlex.join(map(str, e.cmd))}\nfailed (exit status {e.returncode})"
                 + (f":\n{err[-3000:].rstrip()}" if err.strip() else ""))
