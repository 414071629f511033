"""The package's metadata agrees with what CI tests and with what the clone's scripts run."""

import ast
import importlib
import os
import re
import unittest

import dopy
from tests.support import ROOT

try:
    import tomllib
except ImportError:
    # Python 3.10 has no TOML reader; the metadata is the same whichever Python reads it.
    tomllib = None


def read(*path):
    with open(os.path.join(ROOT, *path), encoding='utf-8') as file:
        return file.read()


@unittest.skipIf(tomllib is None, 'no tomllib before Python 3.11')
class Metadata(unittest.TestCase):
    def setUp(self):
        self.pyproject = tomllib.loads(read('pyproject.toml'))
        self.project = self.pyproject['project']

    def ci_versions(self):
        return re.findall(r'^python(3\.\d+) -m unittest$', read('.ci', 'run'), re.MULTILINE)

    def test_the_claimed_pythons_are_those_ci_runs_the_suite_under(self):
        classifiers = self.project['classifiers']
        claimed = [c.rpartition(' :: ')[2] for c in classifiers
                   if re.fullmatch(r'Programming Language :: Python :: 3\.\d+', c)]
        self.assertEqual(claimed, self.ci_versions())
        self.assertEqual(self.project['requires-python'], f'>={self.ci_versions()[0]}')

    def test_the_version_is_the_package_s(self):
        self.assertEqual(self.pyproject['tool']['setuptools']['dynamic']['version'],
                         {'attr': 'dopy.__version__'})
        self.assertRegex(dopy.__version__, r'^\d+\.\d+\.\d+$')

    def test_the_package_is_marked_typed_and_ships_the_marker(self):
        self.assertTrue(os.path.isfile(os.path.join(ROOT, 'dopy', 'py.typed')))
        self.assertIn('py.typed', self.pyproject['tool']['setuptools']['package-data']['dopy'])

    def test_installed_scripts_run_the_functions_the_clone_s_scripts_run(self):
        for script, target in self.project['scripts'].items():
            with self.subTest(script=script):
                module, _, function = target.partition(':')
                self.assertEqual(module, 'dopy.cli')
                # The clone's script is ``from dopy.cli import ...; run(function)``.
                calls = [node for node in ast.walk(ast.parse(read(script)))
                         if isinstance(node, ast.Call) and getattr(node.func, 'id', None) == 'run']
                self.assertEqual([ast.unparse(call.args[0]) for call in calls], [function])
                self.assertTrue(callable(getattr(importlib.import_module(module), function)))


if __name__ == '__main__':
    unittest.main()
