"""Load scenarios for FerrousForge: WebSocket protocol v1 and the OpenAI-compatible SSE route.

Run against a running server (see ``load-tests/README.md``)::

    locust -f load-tests/locustfile.py --headless -u 20 -r 5 -t 60s \\
        --host http://127.0.0.1:11480 --tags steady

Locust measures requests; an LLM server is judged per *generation*, whose
numbers are not one request's duration. So every user here fires its own
request events (``environment.events.request.fire``), which land in locust's
stats table, CSV files and web UI like HTTP requests do. Rows are named
``<scenario> <metric>`` under a type naming the transport (``ws-json``,
``ws-msgpack``, ``sse``):

* ``ttft``       request sent → first text, in ms (one per generation);
* ``itl``        gap between two consecutive text deltas, in ms (one per gap,
                 so the percentiles are those of all gaps);
* ``tokens/s``   decode rate of one generation, (completion tokens - 1) /
                 (last delta - first delta). Locust has no other numeric
                 column, so the *response time columns of this row hold
                 tokens per second*, not milliseconds;
* ``generation`` request sent → end, in ms; response length = text bytes.
                 A failed generation is a failure of this row, and the failure
                 text is the error code (``rate_limited``, ``engine_error``,
                 ``closed 1011``, ``handshake 401 unauthorized``…), so locust's
                 failures table counts failures by code.

Scenarios, selectable by tag (``--tags``) or by class name on the command line:

==========  =====================  ==================================================
tag         class                  what it does
==========  =====================  ==================================================
steady      SteadyChatUser         multi-turn chat on one session, think time between
burst       ConnectionBurstUser    connect, hello, one short generation, disconnect
cancel      CancelStormUser        cancel each generation at a random delta
slow        SlowReaderUser         a WebSocket client that reads a few bytes per second
sse         SseChatUser            ``POST /v1/chat/completions`` with ``stream: true``
mixed       SteadyChatUser +       WebSocket and HTTP clients at once
            SseChatUser
==========  =====================  ==================================================

Locust runs users as gevent greenlets and monkey-patches the standard library
before this file is imported, so every client here is a *blocking* one that
gevent makes cooperative: the WebSocket client is ``websockets``' Sans-I/O
protocol driven on a plain socket by the user's own greenlet (see
``ws_client.WsConnection`` for why not ``websockets.sync``), and HTTP goes
through locust's ``requests`` session. Never import these modules from the
asyncio test suite: run locust as a subprocess.

This file is the entry point; the rest lives in sibling modules, which locust
makes importable by putting this file's directory on ``sys.path``:

=================  ======================================================================
``options.py``     ``--ferrous-*`` options / ``LOCUST_FERROUS_*`` variables, ``Settings``
``reporting.py``   request events per metric, ``Generation``, failures by error code
``prompts.py``     the prompts users send
``ws_client.py``   the WebSocket client and the protocol v1 session
``ws_users.py``    the WebSocket user classes: steady, burst, cancel, slow
``sse_users.py``   the SSE user class
=================  ======================================================================

Locust runs the ``User`` subclasses it finds in this module's namespace, so
the user classes are imported here by name; their shared base is abstract.
"""

from __future__ import annotations

import sse_users
import ws_users
from locust import events
from options import add_arguments, keep_users_with_tasks
from reporting import wait_for_final_csv

# Bound one by one, in this order, which is the order of ``--list`` and the web UI.
SteadyChatUser = ws_users.SteadyChatUser
ConnectionBurstUser = ws_users.ConnectionBurstUser
CancelStormUser = ws_users.CancelStormUser
SlowReaderUser = ws_users.SlowReaderUser
SseChatUser = sse_users.SseChatUser

__all__ = [
    "CancelStormUser",
    "ConnectionBurstUser",
    "SlowReaderUser",
    "SseChatUser",
    "SteadyChatUser",
]

events.init_command_line_parser.add_listener(add_arguments)  # type: ignore[no-untyped-call]
events.init.add_listener(keep_users_with_tasks)  # type: ignore[no-untyped-call]
events.test_stop.add_listener(wait_for_final_csv)  # type: ignore[no-untyped-call]
