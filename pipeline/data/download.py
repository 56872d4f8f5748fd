"""Fetch the http(s) images a collect manifest points at into a local cache, one file per URL.

Why a module of its own: a manifest of URLs meets servers that are slow, down, rate-limited, lying about sizes
or answering with an HTML error page. Each of those must end as a one-line reason the collect stage can put in
rejects.csv, never as a crash halfway through a run, and a re-run must not download anything twice. So:

- only http and https are fetched (a manifest must not make the pipeline read file:// or ftp:// addresses);
- a URL's cached file is `cache/<sha256 of the URL>`, written through a temporary file and a rename, so a file
  under that name is always complete and a re-run makes no request for it; failures are not cached;
- connection errors, timeouts, 5xx and 429 are retried with exponential backoff, or after the wait a 429 or 503
  asks for in Retry-After when that is longer (at most RETRY_AFTER_MAX_S); other answers are final;
- bodies that are not declared as images, or larger than `max_bytes`, are refused without being stored.

Standard library only: urllib, a thread pool, hashlib.
"""

from __future__ import annotations

import email.utils
import hashlib
import http.client
import logging
import re
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Sequence

from pipeline.runtime import atomic
from pipeline.runtime.errors import PipelineError
from pipeline.runtime.progress import Progress

log = logging.getLogger(__name__)

USER_AGENT = "small-data-pipeline/0.1"
SCHEMES = ("http", "https")
CHUNK_BYTES = 64 * 1024
# Object stores often serve images as a generic binary; decoding validates them later.
GENERIC_TYPES = ("application/octet-stream",)
_URL_PREFIX = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")
RETRY_AFTER_MAX_S = 60.0  # a server asking for hours would stall the whole collect stage; we retry sooner


@dataclass(frozen=True)
class DownloadSettings:
    cache: Path  # folder of cached downloads; one file per URL, named by sha256 of the URL
    timeout: float  # seconds for connecting and for each read (a stalled server fails after this)
    retries: int  # extra attempts after the first, for connection errors, timeouts, 5xx and 429
    backoff: float  # seconds before the first retry, doubled for each later one
    max_bytes: int  # larger bodies are refused (checked against Content-Length and while streaming)
    workers: int  # parallel downloads

    def __post_init__(self) -> None:
        # Params validation should have caught these; failing here keeps a bad value from looking like a network
        # problem (timeout=0 would make every request time out).
        allowed = {"timeout": self.timeout > 0, "backoff": self.backoff >= 0, "max_bytes": self.max_bytes > 0,
                   "retries": self.retries >= 0, "workers": self.workers >= 1}
        bad = [f"{name}={getattr(self, name)!r}" for name, ok in allowed.items() if not ok]
        if bad:
            raise ValueError(f"DownloadSettings: {', '.join(bad)} out of range (need timeout > 0, backoff >= 0, "
                             "max_bytes > 0, retries >= 0, workers >= 1)")


class _Failed(Exception):
    """One attempt failed; `retry` says whether another attempt could succeed, `wait` how long the server asked
    us to wait first (seconds, from Retry-After), if it did."""

    def __init__(self, reason: str, retry: bool, wait: float | None = None):
        super().__init__(reason)
        self.retry, self.wait = retry, wait


class _HttpOnlyRedirects(urllib.request.HTTPRedirectHandler):
    """urllib follows redirects to ftp:// too; a server must not lead us anywhere a manifest could not."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        scheme = urllib.parse.urlsplit(newurl).scheme.lower()
        if scheme not in SCHEMES:
            raise urllib.error.HTTPError(newurl, code, f"redirect to {scheme}:// refused, only http and https "
                                         "are fetched", headers, fp)
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def is_url(text: str) -> bool:
    """True for `scheme://...` in any scheme, so ftp:// and file:// entries are refused rather than taken for
    local paths. Drive letters (C:\\...) and plain paths are not URLs."""
    return bool(_URL_PREFIX.match(text))


def cache_path(url: str, cache: Path) -> Path:
    return Path(cache) / hashlib.sha256(url.encode("utf-8")).hexdigest()


def _mb(n: int) -> str:
    return f"{n / 1_000_000:g} MB"


def _request_url(url: str) -> str:
    """Percent-encode spaces and non-ASCII in the path and query, as browsers do (http.client refuses them raw).
    Reserved characters and existing %-escapes are kept, so a valid URL is sent unchanged."""
    parts = urllib.parse.urlsplit(url)
    path = urllib.parse.quote(parts.path, safe="/:@!$&'()*+,;=%~")
    query = urllib.parse.quote(parts.query, safe="/?:@!$&'()*+,;=%~")
    return urllib.parse.urlunsplit((parts.scheme, parts.netloc, path, query, ""))


def retry_after(value: str | None) -> float | None:
    """Seconds a Retry-After header asks for (a number of seconds or an HTTP date), within [0, RETRY_AFTER_MAX_S];
    None when absent or unreadable, so the usual backoff applies."""
    value = (value or "").strip()
    if value.isdigit():
        seconds = float(value)
    else:
        try:
            seconds = (email.utils.parsedate_to_datetime(value) - datetime.now(timezone.utc)).total_seconds()
        except (TypeError, ValueError):  # garbage, or a date without a time zone
            return None
    return min(max(seconds, 0.0), RETRY_AFTER_MAX_S)


def _check_headers(response: http.client.HTTPResponse, max_bytes: int) -> int | None:
    """Refuse bodies that are not declared as images or are declared too large; return the declared length."""
    declared = response.headers.get("Content-Type")
    if declared is None:
        raise _Failed("no content-type: the server did not say this is an image", retry=False)
    content_type = declared.split(";")[0].strip().lower()
    if not (content_type.startswith("image/") or content_type in GENERIC_TYPES):
        raise _Failed(f"content-type {content_type!r} is not an image", retry=False)
    try:
        length = int(response.headers.get("Content-Length", ""))
    except ValueError:
        return None  # missing or garbled: the streaming check below still caps the size
    if length > max_bytes:
        raise _Failed(f"larger than the {_mb(max_bytes)} limit (Content-Length {length} bytes)", retry=False)
    return length


def _read_body(response: http.client.HTTPResponse, max_bytes: int, length: int | None) -> bytes:
    chunks, size = [], 0
    while chunk := response.read(CHUNK_BYTES):
        size += len(chunk)
        if size > max_bytes:  # no Content-Length, or a server sending more than it said
            raise _Failed(f"larger than the {_mb(max_bytes)} limit (stopped reading at {size} bytes)", retry=False)
        chunks.append(chunk)
    # http.client returns a short body silently when the connection drops early; a truncated image must not
    # be cached as if it were complete.
    if length is not None and size < length:
        raise _Failed(f"truncated response: received {size} of {length} bytes", retry=True)
    return b"".join(chunks)


def _connection_failure(err: urllib.error.URLError, timeout: float) -> _Failed:
    cause = err.reason
    if isinstance(cause, TimeoutError):
        return _Failed(f"timed out after {timeout:g} s", retry=True)
    if isinstance(cause, socket.gaierror):
        # "temporary failure in name resolution" may pass; an unknown host will not
        return _Failed(f"could not resolve host: {cause}", retry=cause.errno == socket.EAI_AGAIN)
    if isinstance(cause, ConnectionError):
        return _Failed(f"could not connect: {cause}", retry=True)
    return _Failed(f"could not connect: {cause}", retry=False)  # e.g. TLS certificate errors


def _attempt(url: str, settings: DownloadSettings, opener: urllib.request.OpenerDirector) -> bytes:
    """One request; returns the body or raises _Failed with a one-line reason."""
    request = urllib.request.Request(_request_url(url), headers={"User-Agent": USER_AGENT})
    try:
        with opener.open(request, timeout=settings.timeout) as response:
            length = _check_headers(response, settings.max_bytes)
            return _read_body(response, settings.max_bytes, length)
    except urllib.error.HTTPError as err:  # before URLError, its parent
        err.close()
        wait = retry_after(err.headers.get("Retry-After")) if err.code in (429, 503) else None
        raise _Failed(f"HTTP {err.code} {err.reason}", retry=err.code >= 500 or err.code == 429, wait=wait) from None
    except urllib.error.URLError as err:
        raise _connection_failure(err, settings.timeout) from None
    except TimeoutError:  # a read stalled after the headers arrived
        raise _Failed(f"timed out after {settings.timeout:g} s", retry=True) from None
    except ConnectionError as err:  # reset or dropped mid-response (includes RemoteDisconnected)
        raise _Failed(f"connection lost: {err or type(err).__name__}", retry=True) from None
    except (ValueError, http.client.InvalidURL) as err:  # bad port, control characters; before HTTPException
        raise _Failed(f"malformed URL: {err}", retry=False) from None
    except http.client.HTTPException as err:  # a malformed or cut-off response, usually transient
        raise _Failed(f"bad HTTP response: {type(err).__name__}: {err}", retry=True) from None
    except OSError as err:  # e.g. TLS errors while reading
        raise _Failed(f"network error: {err}", retry=False) from None


def _download(url: str, settings: DownloadSettings, opener: urllib.request.OpenerDirector) -> bytes | str:
    """The body, or the reason it could not be had after all attempts."""
    attempts = settings.retries + 1
    for attempt in range(1, attempts + 1):
        try:
            return _attempt(url, settings, opener)
        except _Failed as failure:
            if not failure.retry:
                return str(failure)
            if attempt == attempts:
                return f"{failure} (gave up after {attempts} attempt{'s' if attempts > 1 else ''})"
            time.sleep(max(settings.backoff * 2 ** (attempt - 1), failure.wait or 0.0))


def _refusal(url: str) -> str | None:
    """Why `url` is not fetched at all, or None; checked before any network access."""
    try:
        scheme = urllib.parse.urlsplit(url).scheme.lower()
    except ValueError as err:  # e.g. an unclosed "[" in an IPv6 host
        return f"malformed URL: {err}"
    if not scheme:
        return "not a URL: expected an http:// or https:// address"
    if scheme not in SCHEMES:
        return f"unsupported URL scheme {scheme!r}: only http and https are fetched"
    return None


def _fetch_one(url: str, settings: DownloadSettings,
               opener: urllib.request.OpenerDirector) -> tuple[Path | str, str]:
    """(cached path or reason, outcome) where outcome is "fetched", "cached" or "failed"."""
    refusal = _refusal(url)
    if refusal:
        return refusal, "failed"
    target = cache_path(url, settings.cache)
    if target.is_file():  # only a completed rename creates this name; temporaries are ".<name>.*.tmp"
        return target, "cached"
    body = _download(url, settings, opener)
    if isinstance(body, str):
        return body, "failed"
    try:
        atomic.write_bytes(target, body)
    except OSError as err:
        raise PipelineError(f"could not write the download cache {settings.cache}: {err}; check that the folder "
                            "is writable and the disk is not full") from err
    return target, "fetched"


def fetch_all(urls: Sequence[str], settings: DownloadSettings) -> dict[str, Path | str]:
    """url -> path of the cached file, or a one-line human-readable reason it could not be fetched.

    Every distinct URL gets an entry (duplicates are fetched once). Bad URLs and bad servers never raise;
    an unusable cache folder raises PipelineError."""
    unique = list(dict.fromkeys(urls))
    try:
        Path(settings.cache).mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise PipelineError(f"could not create the download cache {settings.cache}: {err}") from err
    opener = urllib.request.build_opener(_HttpOnlyRedirects)  # per call: proxies are read from the environment
    results: dict[str, Path | str] = {}
    outcomes = {"fetched": 0, "cached": 0, "failed": 0}
    # a bar for many URLs on a terminal; the periodic log line always, as a few slow servers can take minutes
    with ThreadPoolExecutor(max_workers=settings.workers) as pool, \
            Progress(total=len(unique), desc="download", unit="url", logger=log,
                     disable=True if len(unique) < 20 else None, log=True) as bar:
        futures = {pool.submit(_fetch_one, url, settings, opener): url for url in unique}
        for future in as_completed(futures):
            results[futures[future]], outcome = future.result()
            outcomes[outcome] += 1
            bar.update()
    log.info("download: %d URLs -> %d fetched, %d from cache, %d failed", len(unique), outcomes["fetched"],
             outcomes["cached"], outcomes["failed"])
    return {url: results[url] for url in unique}
