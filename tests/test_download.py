"""pipeline.data.download against a real HTTP server on 127.0.0.1 whose routes misbehave the ways real servers do:
flaky, down, stalled, lying about sizes, serving HTML, redirecting elsewhere. The server counts requests and
connections, so the tests can tell a cache hit or a refusal from a request that was made."""

from __future__ import annotations

import base64
import hashlib
import http.server
import io
import logging
import socket
import threading
import time
import urllib.parse
from collections import Counter
from datetime import datetime, timedelta, timezone
from email.utils import format_datetime
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.data import download
from pipeline.data.download import DownloadSettings, fetch_all, is_url
from pipeline.runtime.errors import PipelineError

PIXELS = np.arange(16 * 16 * 3, dtype=np.uint16).reshape(16, 16, 3).astype(np.uint8)


def png_bytes(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


PNG = png_bytes(PIXELS)
LIMIT = 10_000  # max_bytes in these tests; PNG is far below it, /huge.png and /liar.png far above
STALL_S = 2.0  # how long /stall.png holds its body back; the client must give up long before


def send(handler, status, body=b"", content_type="image/png", length=True):
    handler.send_response(status)
    if content_type:
        handler.send_header("Content-Type", content_type)
    if length:
        handler.send_header("Content-Length", str(len(body)))
    handler.end_headers()
    handler.wfile.write(body)


def ok(handler, n, query):
    """A PNG after `delay` seconds. The requests waiting count as in flight, and stop counting before the reply
    is sent: counted after it, a worker that already had its reply could start its next request first and be
    counted twice (it was: 5 in flight with 4 workers, on 2 busy cores)."""
    seen = handler.server.seen
    with seen.lock:
        seen.in_flight += 1
        seen.max_in_flight = max(seen.max_in_flight, seen.in_flight)
    time.sleep(float(query.get("delay", ["0"])[0]))
    with seen.lock:
        seen.in_flight -= 1
    send(handler, 200, PNG)


def stream_without_length(handler, n, query):
    send(handler, 200, content_type="image/png", length=False)
    for _ in range(50):
        handler.wfile.write(bytes(1000))


def stall(handler, n, query):
    handler.send_response(200)
    handler.send_header("Content-Type", "image/png")
    handler.send_header("Content-Length", str(len(PNG)))
    handler.end_headers()
    time.sleep(STALL_S)
    handler.wfile.write(PNG)


def truncated(handler, n, query):
    handler.send_response(200)
    handler.send_header("Content-Type", "image/png")
    handler.send_header("Content-Length", str(len(PNG)))
    handler.end_headers()
    handler.wfile.write(PNG[: len(PNG) // 2])  # then the connection closes


def slow_down(handler, n, query):
    if n > 1:
        return send(handler, 200, PNG)
    handler.send_response(429)
    handler.send_header("Retry-After", query["after"][0])
    handler.send_header("Content-Length", "0")
    handler.end_headers()


def redirect(target):
    def route(handler, n, query):
        handler.send_response(302)
        handler.send_header("Location", target.format(port=handler.server.server_address[1]))
        handler.send_header("Content-Length", "0")
        handler.end_headers()
    return route


ROUTES = {
    "/ok.png": ok,
    "/octet.png": lambda h, n, q: send(h, 200, PNG, "application/octet-stream"),
    "/flaky.png": lambda h, n, q: h.send_error(503) if n <= 2 else send(h, 200, PNG),
    "/busy.png": lambda h, n, q: h.send_error(429) if n <= 1 else send(h, 200, PNG),
    "/slow-down.png": slow_down,
    "/down.png": lambda h, n, q: h.send_error(500),
    "/missing.png": lambda h, n, q: h.send_error(404),
    "/garbage.png": lambda h, n, q: send(h, 200, b"<html><body>Sign in</body></html>", "text/html; charset=utf-8"),
    "/notype.png": lambda h, n, q: send(h, 200, PNG, content_type=None),
    "/huge.png": lambda h, n, q: send(h, 200, bytes(5 * LIMIT)),
    "/liar.png": stream_without_length,
    "/truncated.png": truncated,
    "/stall.png": stall,
    "/redirect.png": redirect("/ok.png"),
    "/redirect-ftp.png": redirect("ftp://127.0.0.1:{port}/ok.png"),
}


class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        seen = self.server.seen
        parts = urllib.parse.urlsplit(self.path)
        with seen.lock:
            seen.requests[self.path] += 1
            n = seen.requests[self.path]
            seen.user_agents.add(self.headers["User-Agent"])
        try:
            ROUTES.get(parts.path, lambda h, n, q: h.send_error(404))(self, n, urllib.parse.parse_qs(parts.query))
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client hung up on purpose: size limit or timeout

    def log_message(self, format, *args):
        pass


class Seen:
    """What the server saw; `requests` is keyed by path with query string."""

    def __init__(self):
        self.lock = threading.Lock()
        self.requests = Counter()
        self.connections = 0
        self.user_agents = set()
        self.in_flight = self.max_in_flight = 0
        self.base = ""

    def url(self, path: str) -> str:
        return self.base + path


class CountingServer(http.server.ThreadingHTTPServer):
    daemon_threads = True  # a stalled handler must not hold up shutdown

    def verify_request(self, request, client_address):
        with self.seen.lock:
            self.seen.connections += 1
        return True


@pytest.fixture
def server():
    httpd = CountingServer(("127.0.0.1", 0), Handler)
    httpd.seen = Seen()
    httpd.seen.base = f"http://127.0.0.1:{httpd.server_address[1]}"
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    yield httpd.seen
    httpd.shutdown()
    httpd.server_close()
    thread.join(timeout=5)


def settings(tmp_path: Path, **overrides) -> DownloadSettings:
    values = dict(cache=tmp_path / "cache", timeout=2.0, retries=0, backoff=0.01, max_bytes=LIMIT, workers=2)
    return DownloadSettings(**{**values, **overrides})


def cache_files(tmp_path: Path) -> list[str]:
    return sorted(p.name for p in (tmp_path / "cache").iterdir())


@pytest.mark.parametrize("text, expected", [
    ("http://example.com/a.png", True), ("HTTPS://EXAMPLE.COM/A.PNG", True), ("ftp://host/a.png", True),
    ("file:///etc/passwd", True), ("s3://bucket/key.png", True), ("images/cat.png", False),
    ("/data/raw/cat.png", False), ("C:\\images\\cat.png", False), ("cat:1.png", False), ("", False),
])
def test_is_url_means_any_scheme_with_slashes(text, expected):
    assert is_url(text) is expected


def test_an_image_is_fetched_into_the_cache_under_the_hash_of_its_url(server, tmp_path):
    urls = [server.url("/ok.png"), server.url("/octet.png")]
    result = fetch_all(urls, settings(tmp_path))
    for url in urls:
        assert result[url] == tmp_path / "cache" / hashlib.sha256(url.encode()).hexdigest()
        assert result[url].read_bytes() == PNG
        assert np.array_equal(np.asarray(Image.open(result[url])), PIXELS)
    assert server.user_agents == {download.USER_AGENT}
    assert cache_files(tmp_path) == sorted(p.name for p in result.values())  # no temporaries left behind


def test_a_rerun_requests_nothing_cached_and_tries_failures_again(server, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="pipeline.data.download")
    paths = ["/ok.png", "/octet.png", "/missing.png", "/down.png", "/garbage.png"]
    urls = [server.url(p) for p in paths]
    first = fetch_all(urls, settings(tmp_path))
    assert dict(server.requests) == dict.fromkeys(paths, 1)
    second = fetch_all(urls, settings(tmp_path))
    assert second == first
    assert dict(server.requests) == {"/ok.png": 1, "/octet.png": 1, "/missing.png": 2, "/down.png": 2,
                                     "/garbage.png": 2}
    summaries = [r.getMessage() for r in caplog.records]
    assert summaries == ["download: 5 URLs -> 2 fetched, 0 from cache, 3 failed",
                         "download: 5 URLs -> 0 fetched, 2 from cache, 3 failed"]


def test_duplicate_urls_are_fetched_once(server, tmp_path):
    url = server.url("/ok.png")
    result = fetch_all([url, url, url], settings(tmp_path))
    assert list(result) == [url] and result[url].read_bytes() == PNG
    assert server.requests["/ok.png"] == 1


def test_5xx_and_429_are_retried_with_doubling_backoff(server, tmp_path):
    url = server.url("/flaky.png")
    start = time.monotonic()
    result = fetch_all([url], settings(tmp_path, retries=2, backoff=0.05))
    waited = time.monotonic() - start
    assert result[url].read_bytes() == PNG
    assert server.requests["/flaky.png"] == 3
    assert waited >= 0.05 + 0.1  # both backoffs were slept (a lower bound only)
    busy = server.url("/busy.png")
    assert fetch_all([busy], settings(tmp_path, retries=1))[busy].read_bytes() == PNG
    assert server.requests["/busy.png"] == 2


def test_a_429_waits_as_long_as_its_retry_after_asks_when_that_is_longer_than_the_backoff(server, tmp_path):
    url = server.url("/slow-down.png?after=1")
    start = time.monotonic()
    assert fetch_all([url], settings(tmp_path, retries=1, backoff=0.01))[url].read_bytes() == PNG
    assert time.monotonic() - start >= 1.0
    assert server.requests["/slow-down.png?after=1"] == 2


def test_retry_after_is_read_as_seconds_or_a_date_and_capped():
    soon = format_datetime(datetime.now(timezone.utc) + timedelta(seconds=30), usegmt=True)
    assert download.retry_after("7") == 7.0 and download.retry_after(" 0 ") == 0.0
    assert 27 <= download.retry_after(soon) <= 30
    assert download.retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0  # already past
    assert download.retry_after("86400") == download.RETRY_AFTER_MAX_S
    assert download.retry_after(None) is None and download.retry_after("soon") is None
    assert download.retry_after("-5") is None


def test_giving_up_names_the_last_error_and_the_attempts_and_caches_nothing(server, tmp_path):
    flaky, down = server.url("/flaky.png"), server.url("/down.png")
    assert fetch_all([flaky], settings(tmp_path, retries=1)) == {
        flaky: "HTTP 503 Service Unavailable (gave up after 2 attempts)"}
    assert fetch_all([down], settings(tmp_path, retries=2)) == {
        down: "HTTP 500 Internal Server Error (gave up after 3 attempts)"}
    assert server.requests["/flaky.png"] == 2 and server.requests["/down.png"] == 3
    assert cache_files(tmp_path) == []


def test_client_errors_and_non_images_are_final(server, tmp_path):
    paths = ["/missing.png", "/garbage.png", "/notype.png"]
    result = fetch_all([server.url(p) for p in paths], settings(tmp_path, retries=3))
    assert list(result.values()) == ["HTTP 404 Not Found", "content-type 'text/html' is not an image",
                                     "no content-type: the server did not say this is an image"]
    assert dict(server.requests) == dict.fromkeys(paths, 1)  # none retried
    assert cache_files(tmp_path) == []


def test_bodies_over_the_limit_are_refused_whether_declared_or_streamed(server, tmp_path):
    huge, liar = server.url("/huge.png"), server.url("/liar.png")
    result = fetch_all([huge, liar], settings(tmp_path, retries=2))
    assert result[huge] == "larger than the 0.01 MB limit (Content-Length 50000 bytes)"
    assert result[liar].startswith("larger than the 0.01 MB limit (stopped reading at ")
    assert server.requests["/huge.png"] == 1 and server.requests["/liar.png"] == 1
    assert cache_files(tmp_path) == []


def test_a_truncated_body_is_retried_and_never_cached(server, tmp_path):
    url = server.url("/truncated.png")
    result = fetch_all([url], settings(tmp_path, retries=1))
    half = len(PNG) // 2
    assert result[url] == f"truncated response: received {half} of {len(PNG)} bytes (gave up after 2 attempts)"
    assert server.requests["/truncated.png"] == 2
    assert cache_files(tmp_path) == []


def test_a_stalled_body_times_out_after_the_read_timeout_and_is_retried(server, tmp_path):
    url = server.url("/stall.png")
    start = time.monotonic()
    result = fetch_all([url], settings(tmp_path, timeout=0.3, retries=1))
    assert result[url] == "timed out after 0.3 s (gave up after 2 attempts)"
    assert server.requests["/stall.png"] == 2
    assert time.monotonic() - start < STALL_S  # gave up before the server ever sent the body
    assert cache_files(tmp_path) == []


def test_connection_refused_is_retried(tmp_path):
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"http://127.0.0.1:{port}/ok.png"
    reason = fetch_all([url], settings(tmp_path, retries=2))[url]
    assert reason.startswith("could not connect: ") and "refused" in reason
    assert reason.endswith("(gave up after 3 attempts)")


def test_other_schemes_are_refused_without_touching_the_network(server, tmp_path):
    port = server.base.rsplit(":", 1)[1]
    data_url = "data:image/png;base64," + base64.b64encode(PNG).decode()  # urllib would happily decode this
    urls = [f"ftp://127.0.0.1:{port}/ok.png", "file:///etc/passwd", data_url, "javascript:alert(1)",
            "images/cat.png"]
    result = fetch_all(urls, settings(tmp_path))
    assert list(result.values()) == [
        "unsupported URL scheme 'ftp': only http and https are fetched",
        "unsupported URL scheme 'file': only http and https are fetched",
        "unsupported URL scheme 'data': only http and https are fetched",
        "unsupported URL scheme 'javascript': only http and https are fetched",
        "not a URL: expected an http:// or https:// address",
    ]
    assert server.connections == 0
    assert cache_files(tmp_path) == []


def test_malformed_urls_get_a_reason_instead_of_raising(tmp_path):
    bad_port, no_host, bad_ipv6 = "http://127.0.0.1:notaport/a.png", "http:///a.png", "http://[::1/a.png"
    result = fetch_all([bad_port, no_host, bad_ipv6], settings(tmp_path, retries=2))
    assert result[bad_ipv6] == "malformed URL: Invalid IPv6 URL"
    assert result[bad_port].startswith("malformed URL: ") and "notaport" in result[bad_port]
    assert result[no_host] == "could not connect: no host given"


def test_redirects_are_followed_only_to_http(server, tmp_path):
    good, ftp = server.url("/redirect.png"), server.url("/redirect-ftp.png")
    result = fetch_all([good, ftp], settings(tmp_path, workers=1))
    assert result[good].read_bytes() == PNG
    assert result[ftp] == "HTTP 302 redirect to ftp:// refused, only http and https are fetched"
    assert dict(server.requests) == {"/redirect.png": 1, "/ok.png": 1, "/redirect-ftp.png": 1}
    assert server.connections == 3  # nothing tried to speak FTP to the server's port


def test_spaces_and_non_ascii_are_percent_encoded_but_the_cache_key_is_the_url_as_written(server, tmp_path):
    url = server.url("/ok.png?name=a b ü")
    result = fetch_all([url], settings(tmp_path))
    assert result[url].read_bytes() == PNG
    assert dict(server.requests) == {"/ok.png?name=a%20b%20%C3%BC": 1}
    assert result[url].name == hashlib.sha256(url.encode()).hexdigest()


def test_parallel_workers_fetch_many_urls_without_hanging(server, tmp_path):
    urls = [server.url(f"/ok.png?i={i}&delay=0.1") for i in range(30)]  # long enough for the workers to overlap
    result = fetch_all(urls, settings(tmp_path, workers=4))
    assert list(result) == urls
    assert all(isinstance(p, Path) and p.read_bytes() == PNG for p in result.values())
    assert len(set(result.values())) == 30 and len(cache_files(tmp_path)) == 30
    assert sum(server.requests.values()) == 30
    assert 2 <= server.max_in_flight <= 4


def test_a_leftover_temporary_file_is_not_taken_for_a_cached_download(server, tmp_path):
    url = server.url("/ok.png")
    name = hashlib.sha256(url.encode()).hexdigest()
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / f".{name}.k1ll3d.tmp").write_bytes(PNG[:20])  # what a killed run leaves behind
    result = fetch_all([url], settings(tmp_path))
    assert server.requests["/ok.png"] == 1
    assert result[url] == tmp_path / "cache" / name and result[url].read_bytes() == PNG


def test_an_unusable_cache_folder_is_a_user_error(tmp_path):
    (tmp_path / "cache").write_text("a file where the cache folder should be")
    with pytest.raises(PipelineError, match="download cache"):
        fetch_all(["http://127.0.0.1:1/a.png"], settings(tmp_path))


def test_out_of_range_settings_are_refused(tmp_path):
    with pytest.raises(ValueError, match="workers=0"):
        settings(tmp_path, workers=0)
    with pytest.raises(ValueError, match="timeout=0"):
        settings(tmp_path, timeout=0)
