"""The tracking store is checked in seconds before a run starts; a run is never left RUNNING."""

from __future__ import annotations

import http.server
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from mlflow.tracking import MlflowClient

from fl_server.tracking import MlflowTracker, TrackingUnavailable, check_tracking, mark_run_ended


def _closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def _http_server(status: int) -> Iterator[str]:
    """A loopback HTTP server answering every GET with ``status``; yields its URI."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            self.send_response(status)
            self.end_headers()
            self.wfile.write(b"OK")

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_a_server_nobody_listens_on_is_refused_naming_the_uri():
    uri = f"http://127.0.0.1:{_closed_port()}"
    with pytest.raises(
        TrackingUnavailable, match=rf"^MLflow tracking server {uri} is not reachable"
    ):
        check_tracking(uri)


def test_the_tracker_checks_before_it_talks_to_mlflow():
    uri = f"http://127.0.0.1:{_closed_port()}"
    with pytest.raises(TrackingUnavailable, match="not reachable"):
        MlflowTracker(uri, "factoryfed", "unused")


@pytest.mark.parametrize(("status", "ok"), [(200, True), (403, False), (503, False)])
def test_an_answering_server_must_be_healthy_and_let_us_in(status, ok):
    with _http_server(status) as uri:
        if ok:
            check_tracking(uri)
        else:
            with pytest.raises(TrackingUnavailable, match=rf"{uri} .*HTTP {status}"):
                check_tracking(uri)


def test_sqlite_needs_an_existing_folder(tmp_path):
    check_tracking(f"sqlite:///{tmp_path / 'mlflow.db'}")
    missing = tmp_path / "nowhere" / "mlflow.db"
    with pytest.raises(TrackingUnavailable, match=r"folder .*nowhere does not exist"):
        check_tracking(f"sqlite:///{missing}")


def test_a_sqlite_file_that_is_a_folder_cannot_be_written(tmp_path):
    # Permission bits do not stop root; a path whose parent is a file stops everyone.
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(TrackingUnavailable, match="does not exist"):
        check_tracking(f"sqlite:///{blocker / 'mlflow.db'}")


def test_a_run_left_running_is_ended_once(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = MlflowTracker(uri, "factoryfed", str(tmp_path / "art"))
    run_id = tracker.start("r", {"a": "1"}, {})
    client = MlflowClient(tracking_uri=uri)
    assert client.get_run(run_id).info.status == "RUNNING"
    assert mark_run_ended(uri, run_id, "KILLED") is True
    assert client.get_run(run_id).info.status == "KILLED"
    # A finished run is never rewritten.
    assert mark_run_ended(uri, run_id, "FAILED") is False
    assert client.get_run(run_id).info.status == "KILLED"


def test_ending_a_run_in_an_unreachable_store_gives_up_at_once():
    assert mark_run_ended(f"http://127.0.0.1:{_closed_port()}", "0" * 32) is False
