import atexit
import os
import shutil
import sys
import tempfile

# Make tests/workers.py importable by worker processes (they unpickle functions by module name).
TESTS = os.path.dirname(__file__)
if TESTS not in sys.path:
    sys.path.insert(0, TESTS)
os.environ["PYTHONPATH"] = TESTS + os.pathsep + os.environ.get("PYTHONPATH", "")

# The suite's own calibration cache (plait.plan.calibrate): a measurement taken under the suite's
# load must never become the user's `--hardware local` (workers and subprocesses inherit it).
_CACHE = tempfile.mkdtemp(prefix="plait-test-cache-")
os.environ["PLAIT_CACHE"] = _CACHE
atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)
