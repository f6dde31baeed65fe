"""Local stand-in for the OpenFaaS gateway + watchdogs: one port, /function/<name> paths, no Docker.

`scripts/serve` runs it (python -m localrun.gateway); localrun.stack.Stack runs it for the tests,
scripts/bench and scripts/loadtest. Each function runs as its own process from a build context laid
out like faas-cli's (template host index.py + handler in function/), exactly the code a container runs.
The gateway proxies to them with timeouts and answers /function/<name>/_/health from the function's
lock file, like of-watchdog.
With --upstream NAME=PORT it starts no function and proxies /function/NAME to one already running on
that port (scripts/bench measures the gateway's hop this way).
"""

import argparse
import json
import logging
import os
import signal
import sys
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Protocol
from wsgiref.types import StartResponse, WSGIApplication, WSGIEnvironment

import requests
import waitress.server
import waitress.utilities
from waitress import create_server
from werkzeug.wrappers import Request, Response

from localrun import hub, netns
from localrun.functions import FunctionProcess
from localrun.layout import ROOT
from localrun.supervisor import Supervisor, say

LOG = logging.getLogger("gateway")
HOP_HEADERS = {
    "connection",
    "keep-alive",
    "transfer-encoding",
    "te",
    "trailer",
    "upgrade",
    "content-length",
    "content-encoding",
    "host",
}
UPSTREAM_TIMEOUT_S = float(os.environ.get("GATEWAY_UPSTREAM_TIMEOUT_S", "120"))
CONNECTIONS = int(os.environ.get("GATEWAY_CONNECTIONS", "1000"))  # waitress's default of 100 stalls at 100 idle
# What the stacks (clip.yml, clip.pro.yml, clip.gpu.yml) preload, so the README's examples answer the first
# time here too; tests/test_docs_commands.py holds the two equal.
STACK_PRELOAD_LABEL_SETS = ("cifar100", "cifar10")
NAMESPACE = "openfaas-fn"  # /function/NAME.openfaas-fn is /function/NAME, as on OpenFaaS (faas-cli invoke)


class Proxied(Protocol):
    """What the gateway needs of a function: a FunctionProcess, or an Upstream already running."""

    @property
    def name(self) -> str: ...

    @property
    def url(self) -> str: ...

    def healthy(self) -> bool: ...


@dataclass(frozen=True)
class Upstream:
    """A function someone else runs (--upstream): always taken for healthy, as it was started ready."""

    name: str
    url: str

    def healthy(self) -> bool:
        return True


def json_response(status: int, code: str, message: str) -> Response:
    return Response(
        json.dumps({"error": {"code": code, "message": message}}), status=status, content_type="application/json"
    )


def protocol_error_as_json(
    self: waitress.utilities.Error, ident: str | None = None
) -> tuple[str, list[tuple[str, str]], bytes]:
    """waitress answers protocol errors itself (duplicate Content-Length, headers too large): JSON, like
    every other answer of the gateway and the functions."""
    body = json.dumps(
        {
            "error": {
                "code": "bad_request" if self.code == 400 else "http_error",
                "message": f"{self.reason}: {self.body}"[:300],
            }
        }
    ).encode()
    return f"{self.code} {self.reason}", [("Content-Type", "application/json")], body


def make_app(functions: Mapping[str, Proxied]) -> WSGIApplication:
    session = requests.Session()
    session.trust_env = False

    def app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        request = Request(environ)
        parts = request.path.split("/", 3)  # "", "function", name, rest
        if len(parts) > 2 and parts[2].endswith("." + NAMESPACE):
            parts[2] = parts[2][: -len(NAMESPACE) - 1]
        if request.path in ("/", ""):
            response = Response(status=302, headers={"Location": "/function/index"})
        elif request.path == "/healthz":
            response = Response("OK")
        elif len(parts) < 3 or parts[1] != "function" or parts[2] not in functions:
            response = json_response(404, "function_not_found", f"No function at {request.path[:100]}.")
        else:
            fn = functions[parts[2]]
            rest = "/" + (parts[3] if len(parts) > 3 else "")
            if rest == "/_/health":
                ok = fn.healthy()
                response = Response("OK" if ok else "Not ready", status=200 if ok else 503)
            else:
                response = proxy(session, fn, request, rest)
        return response(environ, start_response)

    return app


def proxy(session: requests.Session, fn: Proxied, request: Request, path: str) -> Response:
    headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_HEADERS}
    url = fn.url + path
    try:
        upstream = session.request(
            request.method,
            url,
            params=list(request.args.items(multi=True)),
            data=request.get_data(),
            headers=headers,
            allow_redirects=False,
            timeout=(3, UPSTREAM_TIMEOUT_S),
        )
    except requests.Timeout:
        return json_response(504, "function_timeout", f"{fn.name} did not answer within {UPSTREAM_TIMEOUT_S:g} s.")
    except requests.RequestException:
        return json_response(502, "function_unreachable", f"{fn.name} is not running or not reachable.")
    out = Response(upstream.content, status=upstream.status_code)
    for key, value in upstream.headers.items():
        if key.lower() not in HOP_HEADERS:
            out.headers[key] = value
    return out


TRY_URL_INPUT = """\
URL input, tried on this machine (off by default; loopback is refused unless a setting names it):
  python3 -m http.server 8000 --bind 127.0.0.1 &      # in a folder holding cat.jpg
  CLIP_URL_ALLOW_HOSTS=127.0.0.1 CLIP_URL_ALLOW_NETWORKS=127.0.0.1/32 scripts/serve
  curl -H 'Content-Type: application/json' -d '{"url": "http://127.0.0.1:8000/cat.jpg"}' \\
       http://127.0.0.1:8080/function/clip             # or the page's address field
(without --watchdog: behind it each function has a network, and a loopback, of its own)"""


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="scripts/serve",
        description=(__doc__ or "").splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=TRY_URL_INPUT,
    )
    parser.add_argument("--port", type=int, default=int(os.environ.get("GATEWAY_PORT", "8080")))
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--build-dir", default=None, help="default: build/serve-PORT (one per instance)")
    parser.add_argument(
        "--upstream",
        action="append",
        default=[],
        metavar="NAME=PORT",
        help="proxy /function/NAME to a function already running on 127.0.0.1:PORT "
        "(repeatable; then no function is started here)",
    )
    parser.add_argument(
        "--watchdog",
        metavar="FWATCHDOG",
        help="run each function behind this of-watchdog binary, as its image does (the tests do); "
        "each in a network namespace of its own, so as root with iproute2",
    )
    parser.add_argument("--relative-to", metavar="DIR", help=argparse.SUPPRESS)  # scripts/serve: the caller's cwd
    args = parser.parse_args()
    resolve_paths(parser, args)
    if args.watchdog and not args.upstream and netns.problem():
        # of-watchdog 0.11.6 always binds :8081: a second one on this network would panic
        parser.error(f"--watchdog needs a network namespace per function: {netns.problem()}")
    return args


def resolve_paths(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """--watchdog and --build-dir relative to the caller's directory (scripts/serve runs us from the
    repository root and passes it as --relative-to): absolute from here on, as the functions start in
    their own build contexts and namespaces. A watchdog that is not there is said now, in one line."""
    base = Path(args.relative_to or os.getcwd())
    if args.build_dir:
        args.build_dir = str(base / args.build_dir)
    if args.watchdog:
        given, args.watchdog = args.watchdog, os.path.normpath(base / args.watchdog)
        if not (os.path.isfile(args.watchdog) and os.access(args.watchdog, os.X_OK)):
            parser.error(f"--watchdog {given}: no executable file at {args.watchdog}")


def listen(
    args: argparse.Namespace, functions: Mapping[str, Proxied]
) -> "waitress.server.MultiSocketServer | waitress.server.BaseWSGIServer":
    """The gateway's server on its port, or exit with a clear message: a busy port is said before any
    function process exists."""
    try:
        return create_server(
            make_app(functions),
            host=args.host,
            port=args.port,
            threads=32,
            max_request_body_size=256 * 1024 * 1024,
            ident="gateway",
            connection_limit=CONNECTIONS,
            asyncore_use_poll=True,
        )
    except OSError as exc:
        sys.exit(
            f"gateway: cannot listen on {args.host}:{args.port} ({exc.strerror or exc}); "
            "is another scripts/serve running there? Choose another with --port."
        )


def upstreams(specs: Iterable[str]) -> dict[str, Proxied]:
    """--upstream NAME=PORT: functions already running, proxied as they are."""
    functions: dict[str, Proxied] = {}
    for spec in specs:
        name, _, port = spec.partition("=")
        functions[name] = Upstream(name, f"http://127.0.0.1:{port}")
    return functions


def preload_label_sets(env: Mapping[str, str]) -> str:
    """CLIP_PRELOAD_LABEL_SETS as given, else the stacks' sets and the default set (CLIP_LABEL_SET)."""
    if env.get("CLIP_PRELOAD_LABEL_SETS", "").strip():
        return env["CLIP_PRELOAD_LABEL_SETS"]
    default = env.get("CLIP_LABEL_SET", "").strip()
    return ",".join(dict.fromkeys(([default] if default else []) + list(STACK_PRELOAD_LABEL_SETS)))


def start_functions(args: argparse.Namespace) -> dict[str, FunctionProcess]:
    """clip (unless CLIP_URL names a remote one) and index as processes that die with the gateway, even
    when it is killed outright (they would keep their ports). Their logs go to build/serve-PORT/NAME/
    function.log, shown on our stderr as they grow."""
    env = dict(os.environ)
    build_root = Path(args.build_dir or ROOT / "build" / f"serve-{args.port}")
    functions: dict[str, FunctionProcess] = {}

    def function(name: str, env: Mapping[str, str]) -> FunctionProcess:
        return FunctionProcess(name, build_root, env, log_to_file=True, watchdog=args.watchdog, die_with_parent=True)

    if env.get("CLIP_URL"):
        LOG.info("CLIP_URL=%s: running index only", env["CLIP_URL"])  # fronting a remote clip
    else:
        clip_env = {**hub.offline_if_unreachable(env), "CLIP_PRELOAD_LABEL_SETS": preload_label_sets(env)}
        functions["clip"] = function("clip", clip_env)
        # index calls clip's own process, not back through this gateway: with every gateway thread
        # waiting on index, index's calls would queue behind them (the real gateway has no such pool).
        env = {**env, "CLIP_URL": functions["clip"].url + "/"}
    functions["index"] = function("index", env)
    for fn in functions.values():
        fn.start(wait_ready=False)
        LOG.info("%s: pid %d on %s", fn.name, fn.started.pid, fn.url)
    return functions


def ready_line(args: argparse.Namespace, functions: Mapping[str, FunctionProcess]) -> str:
    """What `serving` says once every function is ready: only the paths that answer."""
    base = f"http://{args.host}:{args.port}/function"
    if "clip" in functions:
        return f"serving {base}/index (page) and {base}/clip (API)"
    return f"serving {base}/index (page), in front of the clip at {os.environ.get('CLIP_URL')}"


def stop_on_signals(supervisor: Supervisor) -> None:
    """SIGTERM/SIGINT: each function drains and stops (the page first, then what it calls), then exit."""

    def stop(signum: int, frame: FrameType | None) -> None:
        threading.Thread(target=supervisor.stop, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)


def main() -> None:
    args = parse_args()
    logging.basicConfig(level="INFO", format="%(asctime)s %(name)s %(levelname)s %(message)s")
    waitress.utilities.Error.to_response = protocol_error_as_json
    functions: dict[str, Proxied] = {}
    server = listen(args, functions)
    if args.upstream:
        functions.update(upstreams(args.upstream))
        say(f"proxying {', '.join(args.upstream)} on http://{args.host}:{args.port}/function/NAME")
    else:
        started = start_functions(args)
        functions.update(started)
        supervisor = Supervisor(started, ready_line(args, started))
        stop_on_signals(supervisor)
        say(f"starting {' and '.join(functions)} behind http://{args.host}:{args.port}")
        supervisor.start()
    server.run()


if __name__ == "__main__":
    main()
