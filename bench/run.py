"""DOPY's benchmark: DOPY against a raw-socket floor, multiprocessing.managers, Pyro5 and RPyC.

    python3 bench/run.py [--quick] [--json FILE] [--results FILE] [--systems floor,dopy,...]
                         [--scenarios latency,throughput,...] [--repetitions N]

Each case runs in a fresh server process with fresh client processes, all
on 127.0.0.1.  The systems take turns case by case (A B C A B C ...), so
that a machine whose speed drifts hits them all alike; the table shows
medians over the repetitions, each with its ratio to the floor measured in
the same repetition (the median of those ratios).  Pyro5 and RPyC take
part when they are installed (``pip install -r bench/requirements.txt``).
Instructions per call are counted once per run, not repeated, for the
floor and DOPY, when valgrind is installed.  The table, with the machine,
the date and the command line, goes to standard output and to the results
file (``bench/RESULTS.md`` unless ``--results`` says otherwise, or
``--quick``).  The exit status is 1 if any case failed to produce its
figures.
"""

import argparse
import datetime
import importlib.metadata
import importlib.util
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time

BENCH = os.path.dirname(os.path.abspath(__file__))
TOP = os.path.dirname(BENCH)
RESULTS = os.path.join(BENCH, 'RESULTS.md')

sys.path.insert(0, TOP)

import harness  # noqa: E402  (needs the path above for dopy)
import instructions  # noqa: E402
import scenarios  # noqa: E402
import systems  # noqa: E402

# A case that takes a system this long is not repeated for it: once is
# enough to show it is slow, and the full run stays within minutes.
SLOW_RUN = 30.0

def main(argv=None):
    args = _parse(argv)
    harness.raise_fd_limit()
    cases = [case for case in scenarios.cases(args.quick) if case.scenario in args.scenarios]
    repetitions = args.repetitions or (1 if args.quick else 3)
    machine = _machine(args.systems)
    machine['argv'] = args.argv
    notes = _general_notes(args)
    began = time.monotonic()
    runs = []
    slow = set()
    for repetition in range(repetitions):
        for case in cases:
            for system in args.systems:
                if (case.name, system) in slow:
                    continue
                if not case.repeated:
                    if repetition == 0 and system in instructions.COUNTED and not instructions.unavailable():
                        runs.append(_count_one(case, system))
                    continue
                run = _run_one(repetition, repetitions, case, system)
                runs.append(run)
                if run['seconds'] > SLOW_RUN:
                    slow.add((case.name, system))
    seconds = time.monotonic() - began
    machine['load_average_after'] = os.getloadavg()
    summary = _summarise(runs, args.systems, cases, repetitions)
    table = _table(summary, args.systems, cases, repetitions, machine, seconds, notes)
    print(table)
    if args.results:
        _write_results(args.results, table, machine)
        print(f'Written to {args.results}', file=sys.stderr)
    if args.json:
        with open(args.json, 'w') as out:
            json.dump({'machine': machine, 'seconds': seconds, 'repetitions': repetitions,
                       'quick': args.quick, 'systems': args.systems,
                       'cases': [case.name for case in cases], 'summary': summary, 'runs': runs},
                      out, indent=1)
    return 1 if any(run['error'] for run in runs) else 0


def _parse(argv):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--quick', action='store_true', help='a smoke run: a few seconds, or about a minute with valgrind')
    parser.add_argument('--json', metavar='FILE', help='write every figure to FILE')
    parser.add_argument('--results', metavar='FILE',
                        help='write the table, the machine and the command line to FILE '
                        f'(default: {os.path.relpath(RESULTS, TOP)}, or none with --quick)')
    parser.add_argument('--systems', help=f'comma-separated, from {",".join(systems.SYSTEMS)} '
                        '(default: all that are installed)')
    parser.add_argument('--scenarios', help=f'comma-separated, from {",".join(scenarios.SCENARIOS)} '
                        '(default: all)')
    parser.add_argument('--repetitions', type=int, help='default 3, or 1 with --quick')
    args = parser.parse_args(argv)
    installed = [name for name in systems.SYSTEMS
                 if name not in systems.OPTIONAL or importlib.util.find_spec(systems.OPTIONAL[name])]
    args.systems = _choose(parser, args.systems, systems.SYSTEMS, 'system') if args.systems else installed
    for name in args.systems:
        if name not in installed:
            parser.error(f'{name} is not installed: pip install -r bench/requirements.txt')
    args.scenarios = (_choose(parser, args.scenarios, scenarios.SCENARIOS, 'scenario')
                      if args.scenarios else list(scenarios.SCENARIOS))
    if args.repetitions is not None and args.repetitions < 1:
        parser.error('--repetitions must be at least 1')
    if args.results is None and not args.quick:
        args.results = RESULTS
    args.argv = sys.argv[1:] if argv is None else list(argv)
    return args


def _general_notes(args):
    """What this run leaves out, and why."""
    notes = []
    if 'latency' in args.scenarios:
        notes.extend(scenarios.pinnings()[1])
    if 'instructions' in args.scenarios:
        missing = instructions.unavailable()
        uncounted = [name for name in args.systems if name not in instructions.COUNTED]
        if missing:
            notes.append(missing)
        elif uncounted:
            notes.append(f'instructions counted for {" and ".join(instructions.COUNTED)} only')
    return notes


def _choose(parser, text, known, what):
    chosen = [name.strip() for name in text.split(',') if name.strip()]
    for name in chosen:
        if name not in known:
            parser.error(f'unknown {what} {name!r}; known: {", ".join(known)}')
    return chosen


def _run_one(repetition, repetitions, case, system):
    started = time.monotonic()
    try:
        outcome = harness.run_case(system, case)
        error = None
    except harness.CaseError as exc:
        outcome = {'metrics': {}, 'notes': {}}
        error = {'message': str(exc), 'detail': exc.detail}
    took = time.monotonic() - started
    status = f'ERROR: {error["message"]}' if error else 'ok'
    print(f'[{repetition + 1}/{repetitions}] {case.name:16} {system:9} {took:5.1f} s  {status}',
          file=sys.stderr, flush=True)
    return {'repetition': repetition, 'case': case.name, 'system': system, 'seconds': took,
            'metrics': outcome['metrics'], 'notes': outcome['notes'], 'error': error}


def _count_one(case, system):
    started = time.monotonic()
    try:
        metrics = instructions.count(system, case.params['calls'], case.params['warm'])
        error = None
    except instructions.CountError as exc:
        metrics = {}
        error = {'message': str(exc), 'detail': exc.detail}
    took = time.monotonic() - started
    status = f'ERROR: {error["message"]}' if error else 'ok'
    print(f'[once] {case.name:16} {system:9} {took:5.1f} s  {status}', file=sys.stderr, flush=True)
    return {'repetition': 0, 'case': case.name, 'system': system, 'seconds': took,
            'metrics': metrics, 'notes': {}, 'error': error}


def _machine(system_names):
    model = 'unknown'
    try:
        with open('/proc/cpuinfo') as cpuinfo:
            for line in cpuinfo:
                if line.startswith('model name'):
                    model = line.split(':', 1)[1].strip()
                    break
    except OSError:
        pass
    versions = {}
    for system in system_names:
        if system in systems.OPTIONAL:
            versions[system] = importlib.metadata.version(systems.OPTIONAL[system])
    return {'cpu': model, 'cores': os.cpu_count(),
            'python': f'{platform.python_implementation()} {platform.python_version()}',
            'system': f'{platform.system()} {platform.release()}',
            'versions': versions,
            'date': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
            'commit': _commit(),
            'load_average_before': os.getloadavg()}


def _commit():
    """The checkout's commit, marked if dopy/ or bench/ differ from it; None outside git."""
    try:
        head = subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], cwd=TOP, capture_output=True,
                              text=True, timeout=10)
        changed = subprocess.run(['git', 'status', '--porcelain', '--', 'dopy', 'bench'], cwd=TOP,
                                 capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if head.returncode:
        return None
    return head.stdout.strip() + (' with uncommitted changes' if changed.stdout.strip() else '')


_TOTALLED = {key for row in scenarios.ROWS for key in row.failures}


def _summarise(runs, system_names, cases, repetitions):
    """Per system, case and metric: the values, their median (or total, for failure counts), the ratio."""
    summary = {}
    floor = {(run['repetition'], run['case']): run['metrics'] for run in runs if run['system'] == 'floor'}
    for system in system_names:
        for case in cases:
            mine = [run for run in runs if run['system'] == system and run['case'] == case.name]
            entry = summary.setdefault(system, {}).setdefault(case.name, {})
            if mine and len(mine) < (repetitions if case.repeated else 1):
                entry['notes'] = {'runs': f'ran {len(mine)} of {repetitions} times: one run took '
                                          f'{max(run["seconds"] for run in mine):.0f} s'}
            for run in mine:
                for key, note in run['notes'].items():
                    entry.setdefault('notes', {}).setdefault(key, note)
                if run['error']:
                    entry.setdefault('errors', []).append(run['error']['message'])
            for metric in sorted({key for run in mine for key in run['metrics']}):
                values = [run['metrics'][metric] for run in mine if metric in run['metrics']]
                figure = {'values': values}
                if metric in _TOTALLED:
                    figure['total'] = sum(values)
                else:
                    figure['median'] = statistics.median(values)
                    ratios = [run['metrics'][metric] / base
                              for run in mine
                              if metric in run['metrics']
                              and (base := floor.get((run['repetition'], case.name), {}).get(metric))]
                    if ratios and system != 'floor':
                        figure['ratio_to_floor'] = statistics.median(ratios)
                entry[metric] = figure
    return summary


def _cell(entry, row, show_ratio):
    if entry.get('errors'):
        return 'ERROR'
    figure = entry.get(row.metric)
    if figure is None:
        return 'n/a'
    text = row.fmt.format(figure['median'])
    if show_ratio and row.ratio and 'ratio_to_floor' in figure:
        text += f' ({figure["ratio_to_floor"]:.2f}x)'
    failed = sum(entry[key]['total'] for key in row.failures if key in entry)
    if failed:
        text += f' [{failed} failed]'
    return text


def _table(summary, system_names, cases, repetitions, machine, seconds, general_notes):
    case_names = {case.name for case in cases}
    rows = [row for row in scenarios.ROWS if row.case in case_names]
    show_ratio = 'floor' in system_names
    header = ['', *system_names]
    body = [[row.label, *(_cell(summary[system][row.case], row, show_ratio) for system in system_names)]
            for row in rows]
    widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header))]

    def line(cells):
        return '  '.join([cells[0].ljust(widths[0]),
                          *(cell.rjust(width) for cell, width in zip(cells[1:], widths[1:]))])

    out = [f'DOPY benchmark: {machine["cpu"]}, {machine["cores"]} cores, {machine["python"]}, '
           f'{machine["system"]}',
           f'{repetitions} repetition(s) in {seconds:.0f} s; load average before '
           f'{machine["load_average_before"][0]:.2f}, after {machine["load_average_after"][0]:.2f}; '
           'medians' + ('; (r x) = ratio to the floor in the same repetition' if show_ratio else '')
           + '; [n failed] = total over the repetitions',
           '', line(header), line(['-' * w for w in widths]), *map(line, body), '']
    notes = list(general_notes)
    for system in system_names:
        for case in cases:
            entry = summary[system][case.name]
            for message in entry.get('errors', [])[:1]:
                notes.append(f'{system} {case.name}: ERROR {message}')
            for key, note in entry.get('notes', {}).items():
                notes.append(f'{system} {case.name}: {note}')
    if 'pipelining' in {case.scenario for case in cases}:
        notes.extend(f'{system} pipelining by {systems.SYSTEMS[system].pipelining_how}'
                     for system in system_names if systems.SYSTEMS[system].pipelining_how)
    out.extend(f'* {note}' for note in notes)
    return '\n'.join(out)


def _write_results(path, table, machine):
    versions = ', '.join(f'{name} {version}' for name, version in machine['versions'].items())
    before = ', '.join(f'{load:.2f}' for load in machine['load_average_before'])
    after = ', '.join(f'{load:.2f}' for load in machine['load_average_after'])
    text = f"""# DOPY benchmark: the figures of one run

Written by `bench/run.py`; run it again rather than edit this file.
Manual.html, chapter 22, says what each scenario measures.

- date (UTC): {machine['date']}
- command: `{shlex.join(['python3', 'bench/run.py', *machine['argv']])}` (interpreter: `{sys.executable}`)
- checkout: {machine['commit'] or 'not a git checkout'}
- machine: {machine['cpu']}, {machine['cores']} cores, {machine['system']}
- Python: {machine['python']}{f'; {versions}' if versions else ''}
- load average (1, 5, 15 min): before {before}; after {after}

```
{table}
```
"""
    with open(path, 'w') as out:
        out.write(text)


if __name__ == '__main__':
    sys.exit(main())
