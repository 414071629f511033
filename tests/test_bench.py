"""The benchmark still runs: bench/run.py --quick for DOPY alone produces figures and its results file (never judged for speed)."""

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
    def test_quick_run_for_dopy_produces_figures_and_writes_the_results_file(self):
        with tempfile.TemporaryDirectory() as tmp:
            figures = os.path.join(tmp, 'bench.json')
            results = os.path.join(tmp, 'RESULTS.md')
            proc = subprocess.run([sys.executable, RUN, '--quick', '--systems', 'dopy',
                                   '--json', figures, '--results', results],
                                  capture_output=True, text=True, timeout=TIMEOUT, cwd=ROOT)
            self.assertEqual(proc.returncode, 0, f'stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}')
            with open(figures) as f:
                run = json.load(f)
            with open(results) as f:
                written = f.read()
        summary = run['summary']['dopy']
        for metric in ('calls_per_s', 'p50_us', 'p99_us'):
            self.assertGreater(summary['latency'][metric]['median'], 0, metric)
        for case in ('throughput-8x1', 'throughput-8x2', 'throughput-64x1', 'throughput-64x2'):
            self.assertGreater(summary[case]['calls_per_s']['median'], 0, case)
        # Each pinned variant is measured, or the table says why not.
        for case in ('latency-1core', 'latency-2cores'):
            if case in run['cases']:
                self.assertGreater(summary[case]['calls_per_s']['median'], 0, case)
            else:
                self.assertIn('not measured', proc.stdout)
        if 'total_instructions' in summary['instructions']:
            self.assertGreater(summary['instructions']['total_instructions']['median'], 0)
        else:
            self.assertIn('valgrind', proc.stdout)
        # The results file holds the table printed, and says where and how it was made.
        self.assertIn(proc.stdout.strip(), written)
        for what in ('date (UTC):', 'command: `python3 bench/run.py --quick --systems dopy',
                     'machine:', 'Python:', 'load average'):
            self.assertIn(what, written)


if __name__ == '__main__':
    unittest.main()
