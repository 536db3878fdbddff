"""nbval settings for the notebook series.

nbval waits a hard-coded 5 s for each output message after a cell has finished. On a loaded
2-core CI machine the kernel's IOPub thread can be starved longer than that right after a heavy
cell, which fails a cell that ran fine. Give it a generous margin instead.
"""

OUTPUT_TIMEOUT_S = 120


def pytest_runtest_setup(item):
    if hasattr(item, "output_timeout"):
        item.output_timeout = OUTPUT_TIMEOUT_S
