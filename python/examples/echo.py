#!/usr/bin/env python3
"""An echo server on tcpframe, in four styles.

    python echo.py [--address 127.0.0.1:5882] [--mode callbacks|batches|pull|asyncio] [--backend auto|poll|epoll]
    python echo.py --selftest      # start, talk to itself with tcpframe.Client, stop

Every style takes frames a batch at a time from the library and sends the replies of a
batch in one library call (python/README.md, "Batches and send()").

Needs libtcpframe.so: build it with `cargo build --release` or set TCPFRAME_LIB.
"""
import argparse
import asyncio
import logging
import signal
import sys
import threading
from pathlib import Path

try:
    import tcpframe
except ImportError:  # run from a source checkout, not installed: use ../tcpframe
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import tcpframe


def run_callbacks(args, ready=None, stop_event=None):
    """Callbacks run on the library's loop thread, on_message once per frame; the
    send() calls made there are collected and leave together after each batch."""
    holder = {}

    def on_connect(conn, peer):
        logging.info("connection %d from %s", conn, peer)
        return True  # False would refuse it

    def on_message(conn, data):
        holder["srv"].send(conn, data)

    def on_close(conn, reason):
        logging.info("connection %d closed (%s)", conn, tcpframe.CloseReason(reason).name)

    with tcpframe.Server(args.address, on_message=on_message, on_connect=on_connect,
                         on_close=on_close, backend=args.backend,
                         log=logging.getLogger("tcpframe")) as srv:
        holder["srv"] = srv
        print(f"echo server (callbacks) on port {srv.port}", flush=True)
        if ready:
            ready(srv.port)
        (stop_event or _wait_for_signal()).wait()


def run_batches(args, ready=None, stop_event=None):
    """The batch-level API: on_messages gets a list of (conn, data) per batch,
    send_many sends a list of (conn, data) in one library call."""
    holder = {}

    def on_messages(batch):
        holder["srv"].send_many(batch)

    def on_send_error(conn, data, exc):
        # A reply the library refused when the batch was sent (the peer does not
        # read: FullError; it left meanwhile: NoConnError). Here: drop the slow peer.
        if isinstance(exc, tcpframe.FullError):
            try:
                holder["srv"].abort(conn)
            except tcpframe.TfError:
                pass

    with tcpframe.Server(args.address, on_messages=on_messages, on_send_error=on_send_error,
                         backend=args.backend, log=logging.getLogger("tcpframe")) as srv:
        holder["srv"] = srv
        print(f"echo server (batches) on port {srv.port}", flush=True)
        if ready:
            ready(srv.port)
        (stop_event or _wait_for_signal()).wait()


def run_pull(args, ready=None, stop_event=None):
    """No foreign-thread callbacks: this thread takes the events. The sends made while
    events() hands out one poll's events leave together before the next poll."""
    stop_event = stop_event or _wait_for_signal()
    with tcpframe.PullServer(args.address, backend=args.backend) as srv:
        print(f"echo server (pull) on port {srv.port}", flush=True)
        if ready:
            ready(srv.port)
        while not stop_event.is_set():
            for ev in srv.events(timeout_ms=100, max=256):  # ends after 100 ms without events
                if ev.kind == tcpframe.EventKind.MESSAGE:
                    try:
                        srv.send(ev.conn, ev.data)
                    except tcpframe.NoConnError:
                        pass  # it closed meanwhile; its CLOSE event follows


def run_asyncio(args, ready=None, stop_event=None):
    """The event loop waits on srv.fd with add_reader: nothing blocks it."""
    async def main():
        with tcpframe.PullServer(args.address, backend=args.backend) as srv:
            print(f"echo server (asyncio) on port {srv.port}", flush=True)
            if ready:
                ready(srv.port)
            loop = asyncio.get_running_loop()
            ev_stop = stop_event or _wait_for_signal()
            # Stop the server when asked: aevents() then drains and ends.
            threading.Thread(target=lambda: (ev_stop.wait(), loop.call_soon_threadsafe(srv.stop, 0)),
                             daemon=True).start()
            async for ev in srv.aevents(max=256):
                if ev.kind == tcpframe.EventKind.MESSAGE:
                    try:
                        srv.send(ev.conn, ev.data)  # collected per batch, like transport.write
                    except tcpframe.TfError:
                        pass
    asyncio.run(main())


def _wait_for_signal():
    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    return done


MODES = {"callbacks": run_callbacks, "batches": run_batches, "pull": run_pull, "asyncio": run_asyncio}


def selftest(args):
    for mode, run in MODES.items():
        ports, stop = [], threading.Event()
        got_port = threading.Event()
        t = threading.Thread(target=run, args=(args,),
                             kwargs=dict(ready=lambda p: (ports.append(p), got_port.set()), stop_event=stop))
        t.start()
        try:
            if not got_port.wait(10):
                raise SystemExit(f"{mode}: server did not start")
            with tcpframe.Client("127.0.0.1", ports[0], timeout=5) as c:
                for msg in (b"hello", b"", b"x" * 100_000):
                    assert c.request(msg) == msg, mode
        finally:
            stop.set()
            t.join(10)
        if t.is_alive():
            raise SystemExit(f"{mode}: server did not stop")
        print(f"{mode}: ok", flush=True)
    print("selftest ok")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--address", default="127.0.0.1:5882")
    p.add_argument("--mode", choices=sorted(MODES), default="callbacks")
    p.add_argument("--backend", choices=["auto", "poll", "epoll"], default="auto")
    p.add_argument("--selftest", action="store_true")
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if args.selftest:
        args.address = "127.0.0.1:0"
        selftest(args)
    else:
        MODES[args.mode](args)


if __name__ == "__main__":
    sys.exit(main())
