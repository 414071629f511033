"""The benchmark still runs: bench/run.py --quick for DOPY alone produces figures (never judged for speed)."""

import json
import os
import subprocess
import sys
import tempfile
import unittest

from tests.support import ROOT, Case

RUN = os.path.join(ROOT, 'bench', 'run.py')
TIMEOUT = 120


class QuickRun(Case):
    def test_quick_run_for_dopy_produces_latency_and_throughput_figures(self):
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, 'bench.json')
            proc = subprocess.run([sys.executable, RUN, '--quick', '--systems', 'dopy', '--json', path],
                                  capture_output=True, text=True, timeout=TIMEOUT, cwd=ROOT)
            self.assertEqual(proc.returncode, 0, f'stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}')
            with open(path) as f:
                summary = json.load(f)['summary']['dopy']
        for metric in ('calls_per_s', 'p50_us', 'p99_us'):
            self.assertGreater(summary['latency'][metric]['median'], 0, metric)
        for case in ('throughput-8x1', 'throughput-8x2', 'throughput-64x1', 'throughput-64x2'):
            self.assertGreater(summary[case]['calls_per_s']['median'], 0, case)


if __name__ == '__main__':
    unittest.main()
