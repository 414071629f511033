"""The ``dopyserver`` and ``dopyclient`` programs, and ``python -m dopy``, as functions that return an exit status."""

import argparse
import logging
import sqlite3
import ssl
import sys

from . import auth, naming, rsh, tcp
from .errors import CommunicationError, DopyError
from .hub import THRD_CONN, THRD_FUNC, THRD_NONE, init

__all__ = ['TestObject', 'server_main', 'client_main', 'main', 'TEST_OBJECT_NAME']

TEST_OBJECT_NAME = 'test'


class TestObject:
    """What ``dopyserver`` publishes as ``test``: the methods ``dopyclient`` checks."""

    def echo(self, value):
        """Return ``value`` as it came."""
        return value

    def add(self, a, b=0):
        """Return ``a + b``."""
        return a + b

    def describe(self, *args, **kwargs):
        """Return the positional and keyword arguments as received."""
        return args, kwargs

    def fail(self, message):
        """Raise ``ValueError(message)``."""
        raise ValueError(message)


def server_main(argv=None):
    """Run ``dopyserver``: publish a TestObject and serve it with a console."""
    parser = argparse.ArgumentParser(
        prog='dopyserver',
        description='Serve a DOPY test object (named "test") over TCP. While it serves, '
                    'each line typed on standard input runs as Python, with "hub" and '
                    '"dopy" at hand; end of input, Ctrl-C or SIGTERM stops the server. '
                    'With no input to read (/dev/null, closed, or a terminal it runs in '
                    'the background of), it serves until Ctrl-C or SIGTERM.')
    parser.add_argument('--host', default=tcp.DEFAULT_HOST,
                        help='address to listen on (default %(default)s: this machine only; '
                             '"" for every interface). Anyone who can reach the port can '
                             'run code in this process.')
    parser.add_argument('--port', type=int, default=tcp.DEFAULT_PORT,
                        help='TCP port (default %(default)s; 0 picks a free one)')
    parser.add_argument('--stdio', action='store_true',
                        help='serve over standard input and output instead of TCP, for '
                             'dopy.rsh.remote("ssh HOST dopyserver --stdio", "test"); '
                             'no console, and it stops at the end of its input')
    parser.add_argument('--no-console', action='store_true',
                        help='read no standard input: serve until Ctrl-C or SIGTERM '
                             '(as a service, or under nohup)')
    parser.add_argument('--thread-mode', choices=(THRD_CONN, THRD_FUNC, THRD_NONE), default=THRD_CONN,
                        help='how calls are run: a thread per connection (default), '
                             'a thread per call, or no threads at all')
    parser.add_argument('--naming', nargs='?', const='', metavar='PATH',
                        help=f'also publish a naming context as "{naming.DEFAULT_KEY}": '
                             'in memory, or kept in the SQLite file PATH when given')
    _add_authkey_option(parser)
    parser.add_argument('--tls-cert', metavar='FILE', help='serve over TLS with this certificate (PEM)')
    parser.add_argument('--tls-key', metavar='FILE', help="the TLS certificate's private key (PEM)")
    parser.add_argument('--tls-ca', metavar='FILE',
                        help='require client certificates signed by this CA (PEM)')
    parser.add_argument('--insecure', action='store_true',
                        help='without an authkey, answer clients on other machines too '
                             '(by default only this machine\'s): any of them can run code here')
    args = parser.parse_args(argv)
    # Before the key is read, so that a warning about its file shows.
    logging.basicConfig(level=logging.WARNING, format='dopyserver: %(name)s: %(message)s')
    authkey = _authkey(parser, args)
    ssl_context = _server_tls(parser, args)
    hub = init(threadMode=args.thread_mode, authkey=authkey)
    test = TestObject()
    hub.addObject(TEST_OBJECT_NAME, test)
    if args.naming is not None:
        try:
            context = (naming.PersistentNamingContext(args.naming) if args.naming
                       else naming.StandardNamingContext())
        except sqlite3.Error as exc:
            print(f'dopyserver: cannot open the naming store {args.naming!r}: {exc}', file=sys.stderr)
            return 1
        hub.addObject(naming.DEFAULT_KEY, context)
    if args.stdio:
        # The banner goes first: once the server runs, its first answer could overtake it.
        print('dopyserver: serving "test" over stdio', file=sys.stderr, flush=True)
        server = rsh.makeServer()
        try:
            server.wait()
        except KeyboardInterrupt:
            pass
        finally:
            hub.shutdown()
        return 0
    try:
        server = tcp.makeServer(args.port, host=args.host, insecure=args.insecure,
                                ssl_context=ssl_context)
    except (CommunicationError, ValueError) as exc:
        print(f'dopyserver: {exc}', file=sys.stderr)
        return 1
    banner = f'dopyserver: serving "{TEST_OBJECT_NAME}" on {server.address}'
    names = {'server': server, 'test': test}
    if sys.flags.interactive:
        # python -i dopyserver: Python's own prompt is the console, with the
        # same names at hand, and the server goes on serving from its threads
        # until the interpreter exits.
        vars(sys.modules['__main__']).update(names, hub=hub, dopy=sys.modules[__package__])
        print(banner, file=sys.stderr, flush=True)
        return 0
    try:
        # The banner is printed in here so that a Ctrl-C as soon as it shows
        # is already a clean stop.
        print(banner, file=sys.stderr, flush=True)
        hub.mainloop(console=not args.no_console, namespace=names)
    except KeyboardInterrupt:
        pass
    finally:
        hub.shutdown()
    return 0


def client_main(argv=None):
    """Run ``dopyclient``: the smoke test against a dopyserver."""
    parser = argparse.ArgumentParser(
        prog='dopyclient',
        description='Check a running dopyserver: basic calls, keyword arguments and exceptions.')
    parser.add_argument('address', nargs='?', default='localhost',
                        help='HOST or HOST:PORT of the server ([v6]:PORT for IPv6; '
                             f'default localhost:{tcp.DEFAULT_PORT})')
    parser.add_argument('--stdio', metavar='COMMAND',
                        help='run COMMAND (for example "ssh HOST dopyserver --stdio") and talk '
                             'to it over its standard input and output instead of TCP')
    parser.add_argument('--timeout', type=float, default=10.0,
                        help='seconds to wait for connecting and for each call (default %(default)s)')
    parser.add_argument('--tls-ca', metavar='FILE',
                        help="connect over TLS, trusting the server's certificate if this CA (PEM) signed it")
    parser.add_argument('--tls-cert', metavar='FILE', help='a client certificate to present (PEM)')
    parser.add_argument('--tls-key', metavar='FILE', help="the client certificate's private key (PEM)")
    _add_authkey_option(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format='dopyclient: %(name)s: %(message)s')
    authkey = _authkey(parser, args)
    ssl_context = _client_tls(parser, args)
    if args.stdio:
        where = args.stdio
        connect = lambda: rsh.remote(args.stdio, TEST_OBJECT_NAME, timeout=args.timeout)
    else:
        try:
            host, port = _split_address(args.address)
        except ValueError as exc:
            parser.error(str(exc))
        where = _join_address(host, port)
        connect = lambda: tcp.remote(host, port, TEST_OBJECT_NAME, timeout=args.timeout,
                                     authkey=authkey, ssl_context=ssl_context)
    print(f'connecting to {where}...', flush=True)
    try:
        proxy = connect()
    except CommunicationError as exc:
        print(f'dopyclient: {exc}', file=sys.stderr)
        return 2
    with proxy:
        for title, test in _TESTS:
            try:
                problem = test(proxy)
            except DopyError as exc:
                problem = f'{type(exc).__name__}: {exc}'
            if problem:
                print(f'test of {title} FAILED: {problem}', file=sys.stderr)
                return 1
            print(f'test of {title} ok', flush=True)
    return 0


def _add_authkey_option(parser):
    parser.add_argument('--authkey-file', metavar='FILE',
                        help=f'read the authkey from FILE (else from ${auth.ENV_VARIABLE}, if set); '
                             'server and clients must share it. Never give a key on the command '
                             'line, where other users can see it.')


def _authkey(parser, args):
    try:
        if args.authkey_file:
            return auth.read_authkey_file(args.authkey_file)
        return auth.authkey_from_env()
    except (OSError, ValueError) as exc:
        parser.error(f'no authkey: {exc}')


def _server_tls(parser, args):
    if not args.tls_cert:
        if args.tls_key or args.tls_ca:
            parser.error('--tls-key and --tls-ca go with --tls-cert')
        return None
    try:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(args.tls_cert, args.tls_key)
        if args.tls_ca:
            context.verify_mode = ssl.CERT_REQUIRED
            context.load_verify_locations(args.tls_ca)
    except (OSError, ssl.SSLError) as exc:
        parser.error(f'cannot set up TLS: {exc}')
    return context


def _client_tls(parser, args):
    if not args.tls_ca:
        if args.tls_cert or args.tls_key:
            parser.error('--tls-cert and --tls-key go with --tls-ca')
        return None
    try:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.load_verify_locations(args.tls_ca)
        if args.tls_cert:
            context.load_cert_chain(args.tls_cert, args.tls_key)
    except (OSError, ssl.SSLError) as exc:
        parser.error(f'cannot set up TLS: {exc}')
    return context


def _test_basic(proxy):
    if proxy.echo('hello') != 'hello':
        return 'echo("hello") did not return "hello"'
    if proxy.add(2, 3) != 5:
        return 'add(2, 3) did not return 5'
    return None


def _test_keywords(proxy):
    if proxy.add(a=40, b=2) != 42:
        return 'add(a=40, b=2) did not return 42'
    got = proxy.describe(1, 'two', three=3)
    if got != ((1, 'two'), {'three': 3}):
        return f'describe(1, "two", three=3) returned {got!r}'
    return None


def _test_exceptions(proxy):
    try:
        proxy.fail('expected failure')
    except ValueError as exc:
        if str(exc) != 'expected failure':
            return f'fail() raised ValueError({str(exc)!r}), not the message sent'
        frames = getattr(exc, 'dopy_traceback', None)
        if not frames or frames[-1].name != 'fail':
            return 'the ValueError carried no server-side traceback'
        return None
    return 'fail() did not raise ValueError'


_TESTS = [
    ('basic method invocation', _test_basic),
    ('keyword parms', _test_keywords),
    ('exceptions', _test_exceptions),
]


def _split_address(text):
    if text.startswith('['):
        host, _, rest = text[1:].partition(']')
        port = rest[1:] if rest.startswith(':') else ''
        if rest and not rest.startswith(':'):
            raise ValueError(f'bad address {text!r}: expected [HOST]:PORT')
    elif text.count(':') == 1:
        host, port = text.split(':')
    else:
        host, port = text, ''
    if not host:
        raise ValueError(f'bad address {text!r}: no host')
    if not port:
        return host, tcp.DEFAULT_PORT
    if not port.isdigit() or not 0 < int(port) <= 65535:
        raise ValueError(f'bad port {port!r} in {text!r}')
    return host, int(port)


def _join_address(host, port):
    return f'[{host}]:{port}' if ':' in host else f'{host}:{port}'


USAGE = """\
DOPY, Distributed Objects for Python: call objects in another process as if
they were here. A hub publishes objects (dopy.getHub().addObject), a server
serves them (dopy.tcp.makeServer), and a proxy calls their methods
(dopy.tcp.remote). Manual.html says all.

Commands (each takes --help):
  python -m dopy.demo           run a dopyserver and a dopyclient against it
  dopyserver                    serve a test object, with a Python console
  dopyclient [HOST[:PORT]]      check a running dopyserver
  python -m dopy server ...     dopyserver, where the script is not on the PATH
  python -m dopy client ...     dopyclient, likewise
"""


def main(argv=None):
    """Run ``python -m dopy``: say what DOPY is and its commands, or run ``server`` or ``client``."""
    argv = sys.argv[1:] if argv is None else argv
    commands = {'server': server_main, 'client': client_main}
    if argv and argv[0] in commands:
        return commands[argv[0]](argv[1:])
    if argv and argv[0] not in ('-h', '--help'):
        print(f'python -m dopy: no command {argv[0]!r}\n\n{USAGE}', end='', file=sys.stderr)
        return 2
    print(USAGE, end='')
    return 0


def run(main):
    """Exit with ``main()``'s status; under ``python -i``, return to the prompt instead."""
    status = main()
    if not sys.flags.interactive:
        sys.exit(status)
