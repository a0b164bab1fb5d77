"""Run the real `mpq` entry point with its per-layer work slowed down, so a test can signal it mid-run.

Usage: python slow_cli.py SECONDS mpq-arguments...  Every calibration layer forward and every quantized linear
sleeps SECONDS first; nothing else changes (same main(), same signal handling, same writers). The artifact
writer also sleeps between its files when MPQ_TEST_SLOW_WRITE is set, to hit the window inside the rename dance.
"""

import os
import sys
import time


def slowed(fn, seconds):
    def wrapper(*args, **kwargs):
        time.sleep(seconds)
        return fn(*args, **kwargs)
    return wrapper


if __name__ == "__main__":
    seconds = float(sys.argv.pop(1))
    import mpq.artifact
    import mpq.calib.capture
    import mpq.quant.pipeline

    mpq.calib.capture._layer_forward = slowed(mpq.calib.capture._layer_forward, seconds)
    mpq.quant.pipeline.quantize_planned = slowed(mpq.quant.pipeline.quantize_planned, seconds)
    if os.environ.get("MPQ_TEST_SLOW_WRITE"):
        write = mpq.artifact.write_tensors

        def slow_write(folder, *args, **kwargs):
            print("writing tensors", file=sys.stderr, flush=True)
            time.sleep(float(os.environ["MPQ_TEST_SLOW_WRITE"]))
            return write(folder, *args, **kwargs)

        mpq.artifact.write_tensors = slow_write
    from mpq.cli import main

    sys.argv[0] = "mpq"
    sys.exit(main())
